package handlers

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"

	"github.com/labstack/echo/v4"

	"github.com/claudemesh/meshbroker/protocol"
	"github.com/claudemesh/meshbroker/services"
)

// Invite redemption routes: POST /join (v1 links) and
// POST /invites/:code/claim (v2 codes). Bodies are capped at
// MAX_MESSAGE_BYTES; every refusal is a 4xx with a JSON error and, the
// service guarantees, creates nothing. The rules (signature, expiry,
// revocation, use count, the one-winner race) live in
// services.InviteService.

// errBodyTooLarge is readBody's refusal of a body over the cap.
var errBodyTooLarge = errors.New("payload too large")

// readBody reads at most max bytes of the request body.
func readBody(c echo.Context, max int) ([]byte, error) {
	body, err := io.ReadAll(io.LimitReader(c.Request().Body, int64(max)+1))
	if err != nil {
		return nil, err
	}
	if len(body) > max {
		c.Response().Header().Set("Connection", "close")
		return nil, errBodyTooLarge
	}
	return body, nil
}

func (s *Server) handleJoin(c echo.Context) error {
	fail := func(status int, msg string) error {
		return c.JSON(status, protocol.JoinReply{OK: false, Error: msg})
	}
	body, err := readBody(c, s.cfg.MaxMessageBytes)
	if errors.Is(err, errBodyTooLarge) {
		return fail(http.StatusRequestEntityTooLarge, "payload too large")
	}
	if err != nil {
		return fail(http.StatusBadRequest, "could not read body")
	}
	var req protocol.JoinRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return fail(http.StatusBadRequest, "body must be a JSON object")
	}
	var jr services.JoinV1Request
	var ok [3]bool
	jr.Token, ok[0] = protocol.RawString(req.InviteToken)
	jr.PeerPubkey, ok[1] = protocol.RawString(req.PeerPubkey)
	jr.DisplayName, ok[2] = protocol.RawString(req.DisplayName)
	if absent(req.InvitePayload) || req.InvitePayload[0] != '{' || !ok[0] || !ok[1] || !ok[2] {
		return fail(http.StatusBadRequest, "invite_token, invite_payload, peer_pubkey, display_name required")
	}
	jr.Payload = req.InvitePayload
	res, err := s.svc.Invites.JoinV1(c.Request().Context(), jr)
	if re, ok := services.AsRouteError(err); ok {
		s.log.Info("join refused", "route", "POST /join", "error", re.Code)
		return fail(re.Status, re.Code)
	}
	if err != nil {
		s.log.Error("join", "err", err)
		return fail(http.StatusInternalServerError, "internal error")
	}
	s.log.Info("join", "route", "POST /join", "mesh", res.MeshID, "member", res.MemberID, "already_member", res.AlreadyMember)
	return c.JSON(http.StatusOK, protocol.JoinReply{OK: true, MemberID: res.MemberID, AlreadyMember: res.AlreadyMember})
}

func (s *Server) handleClaim(c echo.Context) error {
	fail := func(status int, msg string) error {
		return c.JSON(status, protocol.ClaimErrorReply{Error: msg})
	}
	body, err := readBody(c, s.cfg.MaxMessageBytes)
	if errors.Is(err, errBodyTooLarge) {
		return fail(http.StatusRequestEntityTooLarge, "payload too large")
	}
	if err != nil {
		return fail(http.StatusBadRequest, "malformed")
	}
	var req protocol.ClaimRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return fail(http.StatusBadRequest, "malformed")
	}
	recipient, ok := protocol.RawString(req.RecipientX25519Pubkey)
	if !ok || recipient == "" {
		return fail(http.StatusBadRequest, "malformed")
	}
	name := ""
	if !absent(req.DisplayName) {
		if name, ok = protocol.RawString(req.DisplayName); !ok {
			return fail(http.StatusBadRequest, "malformed")
		}
	}
	res, err := s.svc.Invites.ClaimV2(c.Request().Context(), c.Param("code"), recipient, name)
	if re, ok := services.AsRouteError(err); ok {
		s.log.Info("invite claim refused", "route", "POST /invites/:code/claim", "error", re.Code)
		return fail(re.Status, re.Code)
	}
	if err != nil {
		s.log.Error("invite claim", "err", err)
		return fail(http.StatusInternalServerError, "internal error")
	}
	s.log.Info("invite claim v2", "route", "POST /invites/:code/claim", "mesh", res.MeshID, "member", res.MemberID, "already_member", res.AlreadyMember)
	return c.JSON(http.StatusOK, res)
}
