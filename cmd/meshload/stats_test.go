package main

import (
	"testing"
	"time"
)

func TestSummarizeNearestRank(t *testing.T) {
	var d []time.Duration
	for i := 100; i >= 1; i-- { // unsorted on purpose
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	got := summarize(d)
	want := latency{N: 100, P50: 50, P95: 95, P99: 99, Max: 100}
	if got != want {
		t.Fatalf("summarize = %+v, want %+v", got, want)
	}
	if got := summarize(nil); got != (latency{}) {
		t.Fatalf("summarize(nil) = %+v", got)
	}
	if got := summarize([]time.Duration{7 * time.Millisecond}); got.P50 != 7 || got.P99 != 7 || got.Max != 7 {
		t.Fatalf("one sample: %+v", got)
	}
}

func TestSendIndex(t *testing.T) {
	for _, tt := range []struct {
		id   string
		n    int
		want int
		ok   bool
	}{
		{"m0", 10, 0, true},
		{"m9", 10, 9, true},
		{"m10", 10, 0, false},
		{"m-1", 10, 0, false},
		{"x1", 10, 0, false},
		{"", 10, 0, false},
		{"r1", 10, 0, false},
	} {
		k, ok := sendIndex(tt.id, tt.n)
		if ok != tt.ok || (ok && k != tt.want) {
			t.Errorf("sendIndex(%q, %d) = %d, %v; want %d, %v", tt.id, tt.n, k, ok, tt.want, tt.ok)
		}
	}
}

func TestMetricsURLFor(t *testing.T) {
	for in, want := range map[string]string{
		"ws://127.0.0.1:7900/ws":      "http://127.0.0.1:7900/metrics",
		"wss://broker.example/ws?x=1": "https://broker.example/metrics",
		"ws://[::1]:7900/ws":          "http://[::1]:7900/metrics",
	} {
		if got := metricsURLFor(in); got != want {
			t.Errorf("metricsURLFor(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParseFlagsRejects(t *testing.T) {
	base := []string{"--data-dir", t.TempDir()}
	for _, args := range [][]string{
		{},                                   // no database
		append(base, "--peers", "1"),         // nobody to send to
		append(base, "--priority", "urgent"), // not a priority
		append(base, "--broadcast-share", "2"),
		append(base, "--idle", "5", "--reattach", "5"),
		{"--database-url", "mysql://x", "--peers", "2"},
	} {
		if _, err := parseFlags(args, discard{}); err == nil {
			t.Errorf("parseFlags(%q) accepted", args)
		}
	}
	o, err := parseFlags(append(base, "--peers", "3", "--rate", "100"), discard{})
	if err != nil || o.peers != 3 || o.rate != 100 || o.batch != 20 || o.batchGap != 50*time.Millisecond {
		t.Fatalf("parseFlags: %+v, %v", o, err)
	}
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
