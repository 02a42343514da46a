package handlers

import (
	"errors"
	"net/http"

	"github.com/labstack/echo/v4"

	"github.com/claudemesh/meshbroker/services"
)

// Member HTTP routes: GET /mesh/:meshId/members, PATCH
// /mesh/:meshId/member/:memberId, PATCH /mesh/:meshId/settings. Every
// call first proves membership (services.MemberAPI.Authenticate: a signed
// request, or the address of a live session); what the caller may change
// is the service's rule.

// routeMeshAPI registers the invite and member routes.
func (s *Server) routeMeshAPI(e *echo.Echo) {
	e.POST("/join", exact(s.handleJoin))
	e.POST("/invites/:code/claim", s.handleClaim)
	e.GET("/mesh/:meshId/members", s.handleMembersList)
	e.PATCH("/mesh/:meshId/member/:memberId", s.handleMemberPatch)
	e.PATCH("/mesh/:meshId/settings", s.handleMeshSettings)
}

// RemoteIP is the socket's client address, for the member routes'
// live-session proof.
func (w *wsConn) RemoteIP() string { return w.clientIP }

type memberFail struct {
	OK    bool   `json:"ok"`
	Error string `json:"error"`
}

// memberCaller reads the body and authenticates the caller of a member
// route. On refusal the response is already written and caller is nil.
func (s *Server) memberCaller(c echo.Context) (*services.MemberRow, []byte, error) {
	body, err := readBody(c, s.cfg.MaxMessageBytes)
	if errors.Is(err, errBodyTooLarge) {
		return nil, nil, c.JSON(http.StatusRequestEntityTooLarge, memberFail{Error: "payload too large"})
	}
	if err != nil {
		return nil, nil, c.JSON(http.StatusBadRequest, memberFail{Error: "could not read body"})
	}
	r := c.Request()
	caller, err := s.svc.MemberAPI.Authenticate(r.Context(), services.MemberRequest{
		MeshID: c.Param("meshId"), MemberID: r.Header.Get("X-Member-Id"),
		Timestamp: r.Header.Get("X-Claudemesh-Timestamp"), Signature: r.Header.Get("X-Claudemesh-Signature"),
		Method: r.Method, Path: r.URL.EscapedPath(), Body: body, RemoteIP: s.clientIP(r),
		Origin: r.Header.Get("Origin"),
	})
	if err != nil {
		return nil, nil, s.memberError(c, err)
	}
	return caller, body, nil
}

func (s *Server) memberError(c echo.Context, err error) error {
	if re, ok := services.AsRouteError(err); ok {
		s.log.Info("member route refused", "route", c.Request().Method+" "+c.Path(), "status", re.Status, "error", re.Code)
		return c.JSON(re.Status, memberFail{Error: re.Code})
	}
	s.log.Error("member route", "route", c.Request().Method+" "+c.Path(), "err", err)
	return c.JSON(http.StatusInternalServerError, memberFail{Error: "internal error"})
}

func (s *Server) handleMembersList(c echo.Context) error {
	caller, _, err := s.memberCaller(c)
	if caller == nil {
		return err
	}
	members, err := s.svc.MemberAPI.ListMembers(c.Request().Context(), caller.MeshID)
	if err != nil {
		return s.memberError(c, err)
	}
	return c.JSON(http.StatusOK, map[string]any{"ok": true, "members": members})
}

func (s *Server) handleMemberPatch(c echo.Context) error {
	caller, body, err := s.memberCaller(c)
	if caller == nil {
		return err
	}
	u, err := services.ParseMemberUpdate(body)
	if err != nil {
		return s.memberError(c, err)
	}
	res, err := s.svc.MemberAPI.UpdateMember(c.Request().Context(), caller, c.Param("memberId"), u)
	if err != nil {
		return s.memberError(c, err)
	}
	s.log.Info("member-patch", "mesh", caller.MeshID, "caller", caller.ID, "member", res.Member.ID)
	return c.JSON(http.StatusOK, res)
}

func (s *Server) handleMeshSettings(c echo.Context) error {
	caller, body, err := s.memberCaller(c)
	if caller == nil {
		return err
	}
	p, err := services.ParseSettings(body)
	if err != nil {
		return s.memberError(c, err)
	}
	if err := s.svc.MemberAPI.UpdateSettings(c.Request().Context(), caller, p); err != nil {
		return s.memberError(c, err)
	}
	return c.JSON(http.StatusOK, map[string]bool{"ok": true})
}
