package config

import (
	"regexp"
	"strings"
	"testing"
	"time"
)

// Every numeric variable has a range: the value just outside either end is
// refused with a message naming the variable and the range, the ends
// themselves are accepted.
func TestNumericVariablesHaveRanges(t *testing.T) {
	for _, tt := range []struct {
		name             string
		lo, hi           string
		belowLo, aboveHi string
	}{
		{"BROKER_PORT", "0", "65535", "-1", "65536"},
		{"STATUS_TTL_SECONDS", "1", "86400", "0", "86401"},
		{"HOOK_FRESH_WINDOW_SECONDS", "1", "86400", "0", "86401"},
		{"MAX_CONNECTIONS_PER_MESH", "1", "1000000", "0", "1000001"},
		{"MAX_MESSAGE_BYTES", "4096", "67108864", "4095", "67108865"},
		{"HOOK_RATE_LIMIT_PER_MIN", "1", "1000000", "0", "1000001"},
		{"SEND_RATE_LIMIT_PER_MIN", "0", "1000000", "-1", "1000001"},
		{"SEND_RATE_BURST", "1", "1000000", "0", "1000001"},
		{"LEASE_TTL_MS", "10", "86400000", "9", "86400001"},
		{"HELLO_TIMEOUT_MS", "10", "600000", "9", "600001"},
		{"GOGC", "1", "10000", "0", "10001"},
		{"DB_START_TIMEOUT_MS", "0", "3600000", "-1", "3600001"},
		{"HOOK_RATE_LIMIT_PER_ADDR_PER_MIN", "1", "1000000", "0", "1000001"},
		{"HOOK_PENDING_MAX", "1", "1000000", "0", "1000001"},
		{"CLAIM_LEASE_MS", "100", "3600000", "99", "3600001"},
		{"CLAIM_REAP_INTERVAL_MS", "10", "600000", "9", "600001"},
		{"PUSH_CONFIRM_MS", "1", "10000", "0", "10001"},
		{"DELIVERED_FLUSH_MS", "1", "100", "0", "101"},
		{"SHUTDOWN_TIMEOUT_MS", "100", "600000", "99", "600001"},
		{"SHUTDOWN_CONFIRM_MS", "1", "60000", "0", "60001"},
		{"CLEAN_CLOSE_LEASE_MS", "0", "60000", "-1", "60001"},
	} {
		for _, ok := range []string{tt.lo, tt.hi} {
			if _, err := Load(env(map[string]string{tt.name: ok})); err != nil {
				t.Errorf("%s=%s refused: %v", tt.name, ok, err)
			}
		}
		for _, bad := range []string{tt.belowLo, tt.aboveHi} {
			_, err := Load(env(map[string]string{tt.name: bad}))
			if err == nil {
				t.Errorf("%s=%s accepted", tt.name, bad)
				continue
			}
			if !strings.Contains(err.Error(), tt.name) || !strings.Contains(err.Error(), tt.lo+"-"+tt.hi) {
				t.Errorf("%s=%s: error does not name the variable and its range %s-%s: %v", tt.name, bad, tt.lo, tt.hi, err)
			}
		}
	}
}

// The table above covers every variable whose help speaks of an integer.
func TestEveryIntegerVariableIsInTheRangeTest(t *testing.T) {
	covered := "BROKER_PORT STATUS_TTL_SECONDS HOOK_FRESH_WINDOW_SECONDS MAX_CONNECTIONS_PER_MESH MAX_MESSAGE_BYTES HOOK_RATE_LIMIT_PER_MIN " +
		"SEND_RATE_LIMIT_PER_MIN SEND_RATE_BURST LEASE_TTL_MS HELLO_TIMEOUT_MS GOGC DB_START_TIMEOUT_MS " +
		"HOOK_RATE_LIMIT_PER_ADDR_PER_MIN HOOK_PENDING_MAX CLAIM_LEASE_MS CLAIM_REAP_INTERVAL_MS PUSH_CONFIRM_MS DELIVERED_FLUSH_MS " +
		"SHUTDOWN_TIMEOUT_MS SHUTDOWN_CONFIRM_MS CLEAN_CLOSE_LEASE_MS"
	rangeRE := regexp.MustCompile(`\d+-\d+`)
	for _, v := range vars {
		if strings.Contains(v.accepts, "integer") && !strings.Contains(" "+covered+" ", " "+v.name+" ") {
			t.Errorf("%s takes an integer but is not range-tested", v.name)
		}
		if strings.Contains(v.accepts, "integer") && !rangeRE.MatchString(v.accepts) {
			t.Errorf("%s accepts %q: no range", v.name, v.accepts)
		}
	}
}

func TestMaxMessageBytesTenIsRefused(t *testing.T) {
	_, err := Load(env(map[string]string{"MAX_MESSAGE_BYTES": "10"}))
	if err == nil || !strings.Contains(err.Error(), `MAX_MESSAGE_BYTES="10" is invalid`) || !strings.Contains(err.Error(), "4096-67108864") {
		t.Fatalf("MAX_MESSAGE_BYTES=10: %v", err)
	}
}

func TestOperationsVariables(t *testing.T) {
	c, err := Load(env(map[string]string{"DB_START_TIMEOUT_MS": "1500", "SQLITE_SYNCHRONOUS": "full", "ADMIN_ADDR": "6060"}))
	if err != nil {
		t.Fatal(err)
	}
	if c.DBStartTimeout != 1500*time.Millisecond || c.SQLiteSynchronous != "FULL" || c.AdminAddr != "127.0.0.1:6060" {
		t.Fatalf("%v %q %q", c.DBStartTimeout, c.SQLiteSynchronous, c.AdminAddr)
	}
	d := Default()
	if d.DBStartTimeout != time.Minute || d.SQLiteSynchronous != "NORMAL" || d.AdminAddr != "" || d.BuildRevision() != "unknown" {
		t.Fatalf("defaults: %+v", d)
	}
	for in, want := range map[string]string{"[::1]:6060": "[::1]:6060", ":6060": "127.0.0.1:6060", "0.0.0.0:6060": "0.0.0.0:6060"} {
		c, err := Load(env(map[string]string{"ADMIN_ADDR": in}))
		if err != nil || c.AdminAddr != want {
			t.Errorf("ADMIN_ADDR=%s: %q %v, want %q", in, c.AdminAddr, err, want)
		}
	}
	for _, bad := range [][2]string{{"SQLITE_SYNCHRONOUS", "OFF"}, {"ADMIN_ADDR", "70000"}, {"ADMIN_ADDR", "host"}, {"ADMIN_ADDR", "h:x"}} {
		if _, err := Load(env(map[string]string{bad[0]: bad[1]})); err == nil || !strings.Contains(err.Error(), bad[0]) {
			t.Errorf("%s=%s: %v", bad[0], bad[1], err)
		}
	}
}

func TestProbeHost(t *testing.T) {
	for host, want := range map[string]string{"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "127.0.0.2": "127.0.0.2", "[fd00::1]": "fd00::1", "broker.internal": "broker.internal"} {
		if got := (Config{Host: host}).ProbeHost(); got != want {
			t.Errorf("ProbeHost(%q) = %q, want %q", host, got, want)
		}
	}
	if got := (Config{Host: "::", Port: 7900}).Addr(); got != "[::]:7900" {
		t.Errorf("Addr for :: = %q", got)
	}
}
