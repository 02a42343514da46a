package toolbox

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/protocol"
)

func TestParseCron(t *testing.T) {
	now := time.Date(2026, 12, 1, 9, 30, 20, 0, time.UTC)
	for expr, first := range map[string]time.Time{
		"*/5 * * * *": time.Date(2026, 12, 1, 9, 35, 0, 0, time.UTC),
		"0 9 * * 1":   time.Date(2026, 12, 7, 9, 0, 0, 0, time.UTC), // a Monday
		"* * * * *":   time.Date(2026, 12, 1, 9, 31, 0, 0, time.UTC),
		"@hourly":     time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC),
	} {
		_, got, err := parseCron(expr, now, time.Minute)
		if err != nil || !got.Equal(first) {
			t.Errorf("%q: first fire %v, %v; want %v", expr, got, err, first)
		}
	}
	for _, expr := range []string{"", "nonsense", "60 * * * *", "* * * * * *", "@every 30s", "@every 59s", "0 0 30 2 *", "*/0 * * * *"} {
		_, _, err := parseCron(expr, now, time.Minute)
		var e *Error
		if !errors.As(err, &e) || e.Code != protocol.CodeInvalidCron || !strings.HasPrefix(e.Msg, "Invalid cron expression") {
			t.Errorf("%q: %v, want invalid_cron", expr, err)
		}
	}
	// A period of exactly the minimum is allowed.
	if _, _, err := parseCron("@every 1m", now, time.Minute); err != nil {
		t.Errorf("@every 1m: %v", err)
	}
}

func TestSearchWords(t *testing.T) {
	for q, want := range map[string]string{
		"":                           "",
		"the and of":                 "",
		"?!":                         "",
		"When does the Build break?": "build break",
		"go1.26, sqlite-fts5 & Café": "go1 26 sqlite fts5 café",
		`quote" OR "injection*`:      "quote injection",
	} {
		got := strings.Join(searchWords(q), " ")
		if got != want {
			t.Errorf("searchWords(%q) = %q, want %q", q, got, want)
		}
	}
	if got := ftsQuery([]string{"a1", "b"}); got != `"a1" AND "b"` {
		t.Errorf("ftsQuery = %s", got)
	}
}
