package config

import (
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestLoadDefaults(t *testing.T) {
	c, err := Load(env(nil))
	if err != nil {
		t.Fatal(err)
	}
	if c.Port != 7900 || c.MaxMessageBytes != 65536 || c.LeaseTTL != 90*time.Second ||
		c.HelloTimeout != 10*time.Second || c.StatusTTL != time.Minute || c.HookFreshWindow != 30*time.Second ||
		c.MaxConnectionsPerMesh != 100 || c.HookRateLimitPerMin != 30 || c.DataDir != "./data" || c.DatabaseURL != "" {
		t.Fatalf("defaults differ from the reference: %+v", c)
	}
}

func TestLoadValues(t *testing.T) {
	c, err := Load(env(map[string]string{
		"BROKER_PORT":             "8080",
		"DATABASE_URL":            "postgresql://u@h/db",
		"LEASE_TTL_MS":            "150",
		"HELLO_TIMEOUT_MS":        "20",
		"SEND_RATE_LIMIT_PER_MIN": "0",
		"WATCH_ALLOW_PRIVATE":     "true",
		"LOG_LEVEL":               "debug",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if c.Port != 8080 || c.DatabaseURL != "postgresql://u@h/db" || c.LeaseTTL != 150*time.Millisecond ||
		c.HelloTimeout != 20*time.Millisecond || c.SendRatePerMin != 0 || !c.WatchAllowPrivate || c.LogLevel.String() != "DEBUG" {
		t.Fatalf("values not applied: %+v", c)
	}
}

func TestLoadGOGC(t *testing.T) {
	for raw, want := range map[string]int{"": 50, "200": 200, "off": -1, "OFF": -1} {
		c, err := Load(env(map[string]string{"GOGC": raw}))
		if err != nil || c.GCPercent != want {
			t.Errorf("GOGC=%q: %d, %v; want %d", raw, c.GCPercent, err, want)
		}
	}
}

func TestLoadRefusesEachInvalidVariable(t *testing.T) {
	for _, tt := range []struct{ name, value string }{
		{"BROKER_PORT", "-1"},
		{"BROKER_PORT", "seventy"},
		{"BROKER_PORT", "70000"},
		{"BROKER_HOST", "a b"},
		{"DATABASE_URL", "mysql://x"},
		{"STATUS_TTL_SECONDS", "0"},
		{"HOOK_FRESH_WINDOW_SECONDS", "1.5"},
		{"MAX_CONNECTIONS_PER_MESH", "0"},
		{"MAX_MESSAGE_BYTES", "-5"},
		{"HOOK_RATE_LIMIT_PER_MIN", "x"},
		{"SEND_RATE_LIMIT_PER_MIN", "-1"},
		{"SEND_RATE_BURST", "0"},
		{"LEASE_TTL_MS", "soon"},
		{"HELLO_TIMEOUT_MS", "0"},
		{"WATCH_ALLOW_PRIVATE", "maybe"},
		{"RESUME_TOKEN_KEY", "abc"},
		{"LOG_LEVEL", "loud"},
		{"GOGC", "0"},
		{"GOGC", "fast"},
	} {
		t.Run(tt.name+"="+tt.value, func(t *testing.T) {
			_, err := Load(env(map[string]string{tt.name: tt.value}))
			if err == nil {
				t.Fatalf("%s=%s accepted", tt.name, tt.value)
			}
			if !strings.Contains(err.Error(), tt.name) || !strings.Contains(err.Error(), "expected") {
				t.Fatalf("error does not name the variable and what it accepts: %v", err)
			}
		})
	}
}

func TestUsageListsEveryVariable(t *testing.T) {
	u := Usage()
	for _, v := range vars {
		if !strings.Contains(u, v.name) {
			t.Errorf("--help does not list %s", v.name)
		}
	}
	if !strings.Contains(u, "[7900]") || !strings.Contains(u, "[90000]") {
		t.Errorf("--help does not show defaults:\n%s", u)
	}
}

func TestToolboxLimits(t *testing.T) {
	c, err := Load(env(map[string]string{"TOOLBOX_MAX_MEMORIES": "50", "TOOLBOX_MAX_ITEM_BYTES": "1024"}))
	if err != nil {
		t.Fatal(err)
	}
	if c.Toolbox.MaxMemories != 50 || c.Toolbox.MaxItemBytes != 1024 || c.Toolbox.MaxTasks != DefaultToolbox().MaxTasks {
		t.Fatalf("toolbox limits not applied: %+v", c.Toolbox)
	}
	for _, bad := range []struct{ name, value string }{
		{"TOOLBOX_MAX_MEMORIES", "0"}, {"TOOLBOX_MAX_MEMORIES", "2000000"}, {"TOOLBOX_MAX_ITEM_BYTES", "10"},
		{"TOOLBOX_MAX_SCHEDULES_PER_MEMBER", "x"}, {"TOOLBOX_MAX_VAULT_ENTRIES", "-3"},
	} {
		if _, err := Load(env(map[string]string{bad.name: bad.value})); err == nil || !strings.Contains(err.Error(), bad.name) {
			t.Errorf("%s=%s: err %v, want a refusal naming it", bad.name, bad.value, err)
		}
	}
	if !strings.Contains(Usage(), "TOOLBOX_MAX_SCHEDULES_PER_MEMBER") {
		t.Error("--help does not list the toolbox variables")
	}
}
