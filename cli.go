package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/claudemesh/meshbroker/config"
	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/services"
)

// runCommand runs a provisioning subcommand against the configured
// database. Bad input is reported on stderr with exit code 2 and changes
// nothing.
func runCommand(args []string, cfg config.Config, logger *slog.Logger, stdout, stderr io.Writer) int {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	fail := func(code int, format string, a ...any) int {
		fmt.Fprintf(stderr, "meshbroker: "+format+"\n", a...)
		return code
	}
	if args[0] == "healthcheck" {
		return healthcheck(cfg, stderr)
	}
	if args[0] == "keygen" {
		if len(args) > 1 {
			return fail(2, "keygen takes no arguments")
		}
		return keygen(stdout, stderr)
	}
	cmd := args[0]
	if len(args) > 1 && (cmd == "mesh" || cmd == "member" || cmd == "invite") && !strings.HasPrefix(args[1], "-") {
		cmd += " " + args[1]
		args = args[2:]
	} else {
		args = args[1:]
	}
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		meshID    = fs.String("mesh", "", "mesh id")
		pubkey    = fs.String("pubkey", "", "member public key, 64 hex characters (see meshbroker keygen)")
		name      = fs.String("name", "", "display name")
		role      = fs.String("role", "member", "admin or member")
		member    = fs.String("member", "", "member id or pubkey")
		ownerUser = fs.String("owner-user", "", "mesh.owner_user_id (an existing user id on a database the web app shares)")
		ownerName = fs.String("owner-name", "", "display name of the owner member")
		out       = fs.String("out", "demo-identities.json", "where demo writes the identities")
		maxUses   = fs.Int("max-uses", 1, "how many members one invite admits")
		expires   = fs.String("expires", "7d", "invite lifetime: a Go duration (90m, 48h) or days (7d)")
		brokerURL = fs.String("broker-url", "", "ws:// or wss:// URL of this broker, written into the v1 link (default ws://localhost:BROKER_PORT/ws)")
		inviteRef = fs.String("invite", "", "invite id or code")
	)
	var positional []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			return 2
		}
		args = fs.Args()
		if len(args) > 0 {
			positional = append(positional, args[0])
			args = args[1:]
		}
	}
	switch cmd {
	case "mesh create", "mesh list", "member add", "member list", "member revoke", "demo", "invite create", "invite list", "invite revoke":
	default:
		return fail(2, "unknown command %q (see meshbroker --help)", cmd)
	}
	if cmd == "mesh create" && len(positional) != 1 {
		return fail(2, "mesh create needs exactly one NAME")
	}
	if cmd == "member add" && (*meshID == "" || *pubkey == "" || *name == "") {
		return fail(2, "member add needs --mesh, --pubkey and --name")
	}
	if cmd == "member revoke" && (*meshID == "" || *member == "") {
		return fail(2, "member revoke needs --mesh and --member")
	}
	if cmd == "member list" && *meshID == "" {
		return fail(2, "member list needs --mesh")
	}
	if (cmd == "mesh list" || cmd == "member list") && len(positional) > 0 {
		return fail(2, "%s takes no positional arguments", cmd)
	}
	if strings.HasPrefix(cmd, "invite ") && *meshID == "" {
		return fail(2, "%s needs --mesh", cmd)
	}
	if cmd == "invite revoke" && *inviteRef == "" {
		return fail(2, "invite revoke needs --invite")
	}
	var inviteTTL time.Duration
	if cmd == "invite create" {
		var err error
		if inviteTTL, err = parseLifetime(*expires); err != nil {
			return fail(2, "--expires: %v", err)
		}
		if *brokerURL == "" {
			*brokerURL = fmt.Sprintf("ws://localhost:%d/ws", cfg.Port)
		}
	}
	db, err := models.Open(ctx, cfg.DatabaseURL, cfg.DataDir, logger)
	if err != nil {
		return fail(1, "%v", err)
	}
	defer db.Close()
	if err := db.Bootstrap(ctx); err != nil {
		return fail(1, "%v", err)
	}
	prov := services.NewProvisionService(db, time.Now)
	print := func(v any) int {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(v); err != nil {
			return fail(1, "%v", err)
		}
		return 0
	}
	switch cmd {
	case "mesh create":
		id, err := prov.CreateMesh(ctx, positional[0], *ownerUser, *ownerName)
		if err != nil {
			return fail(2, "%v", err)
		}
		return print(id)
	case "member add":
		id, err := prov.AddMember(ctx, *meshID, *pubkey, *name, *role)
		if err != nil {
			return fail(2, "%v", err)
		}
		return print(id)
	case "mesh list":
		meshes, err := prov.ListMeshes(ctx)
		if err != nil {
			return fail(1, "%v", err)
		}
		return print(meshes)
	case "member list":
		members, err := prov.ListMembers(ctx, *meshID)
		if err != nil {
			return fail(2, "%v", err)
		}
		return print(members)
	case "member revoke":
		revoked, err := prov.RevokeMember(ctx, *meshID, *member)
		if err != nil {
			return fail(2, "%v", err)
		}
		return print(map[string]string{"revoked": revoked}) // normalized: a key in lower case

	case "invite create":
		inv, err := services.NewInviteService(db, time.Now, nil).Create(ctx, *meshID, services.InviteOptions{Role: *role, MaxUses: *maxUses, TTL: inviteTTL, BrokerURL: *brokerURL})
		if err != nil {
			return fail(2, "%v", err)
		}
		return print(inv)
	case "invite list":
		list, err := services.NewInviteService(db, time.Now, nil).List(ctx, *meshID)
		if err != nil {
			return fail(1, "%v", err)
		}
		return print(list)
	case "invite revoke":
		if err := services.NewInviteService(db, time.Now, nil).Revoke(ctx, *meshID, *inviteRef); err != nil {
			return fail(2, "%v", err)
		}
		return print(map[string]string{"revoked": *inviteRef})
	default: // demo
		ids, err := prov.Demo(ctx, "demo")
		if err != nil {
			return fail(1, "%v", err)
		}
		b, _ := json.MarshalIndent(ids, "", "  ")
		if err := os.WriteFile(*out, append(b, '\n'), 0o600); err != nil {
			return fail(1, "write %s: %v", *out, err)
		}
		fmt.Fprintf(stdout, "mesh %s with members alice and bob; identities written to %s\n", ids[0].MeshID, *out)
		return 0
	}
}

// parseLifetime reads a Go duration or a whole number of days ("7d").
func parseLifetime(s string) (time.Duration, error) {
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.Atoi(days)
		if err != nil || n <= 0 {
			return 0, fmt.Errorf("%q is not a number of days", s)
		}
		return time.Duration(n) * 24 * time.Hour, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%q is not a positive duration", s)
	}
	return d, nil
}

// healthcheck probes this machine's broker, for container HEALTHCHECKs on
// images without curl.
func healthcheck(cfg config.Config, stderr io.Writer) int {
	c := http.Client{Timeout: 5 * time.Second}
	// The broker listens on BROKER_HOST: a specific address must be probed
	// there, the wildcard ones on loopback.
	url := "http://" + net.JoinHostPort(cfg.ProbeHost(), strconv.Itoa(cfg.Port)) + "/health"
	resp, err := c.Get(url)
	if err != nil {
		fmt.Fprintln(stderr, "meshbroker: healthcheck:", err)
		return 1
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintln(stderr, "meshbroker: healthcheck: status", resp.StatusCode)
		return 1
	}
	return 0
}

// keygen prints a fresh ed25519 key pair as JSON: the pubkey to give
// `member add`, the secret for the client's identity file. Nothing is
// stored; the secret exists only on stdout.
func keygen(stdout, stderr io.Writer) int {
	key, err := services.NewIdentityKey()
	if err != nil {
		fmt.Fprintln(stderr, "meshbroker: keygen:", err)
		return 1
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(services.NewKeyPair(key)); err != nil {
		fmt.Fprintln(stderr, "meshbroker: keygen:", err)
		return 1
	}
	return 0
}
