package config

import (
	"strings"
	"testing"
)

// CLIENT_IP_HEADER takes any HTTP field name (an RFC 9110 token) and keeps
// it in canonical form; anything else is refused at start, naming the
// variable and what it accepts.
func TestClientIPHeaderValidation(t *testing.T) {
	for raw, want := range map[string]string{
		"Fly-Client-IP":    "Fly-Client-Ip",
		"x-forwarded-for":  "X-Forwarded-For",
		"  X-Real-IP  ":    "X-Real-Ip",
		"X_Real.IP~1":      "X_real.ip~1", // any token, in the form net/http looks it up by
		"True-Client-IP":   "True-Client-Ip",
		"CF-Connecting-IP": "Cf-Connecting-Ip",
	} {
		c, err := Load(env(map[string]string{"CLIENT_IP_HEADER": raw}))
		if err != nil || c.ClientIPHeader != want || len(c.Warnings) != 0 {
			t.Errorf("CLIENT_IP_HEADER=%q: %q, %v, warnings %q; want %q", raw, c.ClientIPHeader, err, c.Warnings, want)
		}
	}
	for _, raw := range []string{"X Client IP", "X-Client-IP:", "X-Client-IP: 1.2.3.4", "(ip)", "X-Clïent", "a/b", "X\"IP", "X-IP\x00", "X,Y"} {
		_, err := Load(env(map[string]string{"CLIENT_IP_HEADER": raw}))
		if err == nil {
			t.Errorf("CLIENT_IP_HEADER=%q accepted", raw)
			continue
		}
		if !strings.Contains(err.Error(), "CLIENT_IP_HEADER=") || !strings.Contains(err.Error(), "expected an HTTP header name") {
			t.Errorf("CLIENT_IP_HEADER=%q: error does not name the variable and what it accepts: %v", raw, err)
		}
	}
	if c, err := Load(env(nil)); err != nil || c.ClientIPHeader != "" || len(c.Warnings) != 0 {
		t.Fatalf("unset: %q, %v, warnings %q; want the TCP peer (empty) and no warning", c.ClientIPHeader, err, c.Warnings)
	}
}

// HOOK_CLIENT_IP_HEADER, the hook routes' name before the merge, is still
// read: alone it is CLIENT_IP_HEADER with a warning to rename it; beside an
// equal CLIENT_IP_HEADER it only earns a warning; beside a different one
// the broker refuses to start rather than pick one.
func TestHookClientIPHeaderAlias(t *testing.T) {
	t.Run("alone", func(t *testing.T) {
		c, err := Load(env(map[string]string{"HOOK_CLIENT_IP_HEADER": "Fly-Client-IP"}))
		if err != nil {
			t.Fatal(err)
		}
		if c.ClientIPHeader != "Fly-Client-Ip" {
			t.Fatalf("ClientIPHeader %q, want the alias's Fly-Client-Ip", c.ClientIPHeader)
		}
		if len(c.Warnings) != 1 || !strings.Contains(c.Warnings[0], "HOOK_CLIENT_IP_HEADER is deprecated") || !strings.Contains(c.Warnings[0], "rename it to CLIENT_IP_HEADER") {
			t.Fatalf("warnings %q, want one saying to rename HOOK_CLIENT_IP_HEADER to CLIENT_IP_HEADER", c.Warnings)
		}
	})
	t.Run("alone and invalid", func(t *testing.T) {
		_, err := Load(env(map[string]string{"HOOK_CLIENT_IP_HEADER": "Fly Client IP"}))
		if err == nil || !strings.Contains(err.Error(), `HOOK_CLIENT_IP_HEADER="Fly Client IP" is invalid`) || !strings.Contains(err.Error(), "expected an HTTP header name") {
			t.Fatalf("err %v, want a refusal naming the variable the operator set", err)
		}
	})
	t.Run("both, equal", func(t *testing.T) {
		c, err := Load(env(map[string]string{"HOOK_CLIENT_IP_HEADER": "fly-client-ip", "CLIENT_IP_HEADER": "Fly-Client-IP"}))
		if err != nil {
			t.Fatal(err)
		}
		if c.ClientIPHeader != "Fly-Client-Ip" || len(c.Warnings) != 1 || !strings.Contains(c.Warnings[0], "HOOK_CLIENT_IP_HEADER is deprecated") {
			t.Fatalf("%q, warnings %q; want Fly-Client-Ip and a warning to remove the old name", c.ClientIPHeader, c.Warnings)
		}
	})
	for _, tt := range []struct{ name, hook, current string }{
		{"both, different", "X-Forwarded-For", "Fly-Client-IP"},
		{"both, the old one invalid", "Fly Client IP", "Fly-Client-IP"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Load(env(map[string]string{"HOOK_CLIENT_IP_HEADER": tt.hook, "CLIENT_IP_HEADER": tt.current}))
			if err == nil {
				t.Fatal("conflicting values accepted")
			}
			for _, want := range []string{`CLIENT_IP_HEADER="` + tt.current + `"`, `HOOK_CLIENT_IP_HEADER="` + tt.hook + `"`, "disagree", "deprecated"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
		})
	}
	if u := Usage(); !strings.Contains(u, "HOOK_CLIENT_IP_HEADER") || !strings.Contains(u, "now CLIENT_IP_HEADER") {
		t.Errorf("--help does not name the deprecated variable:\n%s", u)
	}
}
