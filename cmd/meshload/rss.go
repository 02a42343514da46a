package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// rssSampler records the broker's resident set size and open descriptors:
// from /proc/<pid> when it runs on this machine, else from its Prometheus
// process collector. The zero sampler (no source) records nothing.
//
// Concurrency: the sampling goroutine writes under mu; readers copy under mu.
type rssSampler struct {
	pid        int
	metricsURL string
	interval   time.Duration
	http       *http.Client

	mu      sync.Mutex
	samples []rssSample
	lastErr error
}

type rssSample struct {
	at  time.Time
	rss int64 // bytes
	fds int64 // -1 when unknown
}

func newRSSSampler(o options) *rssSampler {
	return &rssSampler{pid: o.brokerPID, metricsURL: o.metricsURL, interval: o.rssInterval, http: &http.Client{Timeout: 2 * time.Second}}
}

func (s *rssSampler) enabled() bool { return s.pid > 0 || s.metricsURL != "" }

// run samples until ctx ends.
func (s *rssSampler) run(ctx context.Context) {
	if !s.enabled() {
		return
	}
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		s.sampleOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (s *rssSampler) sampleOnce(ctx context.Context) {
	var sm rssSample
	var err error
	if s.pid > 0 {
		sm, err = procSample(s.pid)
	} else {
		sm, err = s.metricsSample(ctx)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.lastErr = err
		return
	}
	s.samples = append(s.samples, sm)
}

// procSample reads VmRSS from /proc/<pid>/status and counts /proc/<pid>/fd.
func procSample(pid int) (rssSample, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return rssSample{}, err
	}
	defer f.Close()
	sm := rssSample{at: time.Now(), fds: -1}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return rssSample{}, fmt.Errorf("parse VmRSS %q: %w", line, err)
			}
			sm.rss = kb * 1024
		}
	}
	if d, err := os.Open(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		names, _ := d.Readdirnames(-1)
		d.Close()
		sm.fds = int64(len(names))
	}
	return sm, nil
}

func (s *rssSampler) metricsSample(ctx context.Context) (rssSample, error) {
	vals, err := scrapeMetrics(ctx, s.http, s.metricsURL, "process_resident_memory_bytes", "process_open_fds")
	if err != nil {
		return rssSample{}, err
	}
	rss, ok := vals["process_resident_memory_bytes"]
	if !ok {
		return rssSample{}, fmt.Errorf("%s has no process_resident_memory_bytes", s.metricsURL)
	}
	sm := rssSample{at: time.Now(), rss: int64(rss), fds: -1}
	if v, ok := vals["process_open_fds"]; ok {
		sm.fds = int64(v)
	}
	return sm, nil
}

// scrapeMetrics returns the values of the named unlabelled series.
func scrapeMetrics(ctx context.Context, hc *http.Client, url string, names ...string) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name, val, ok := strings.Cut(line, " ")
		if !ok || !want[name] {
			continue
		}
		if v, err := strconv.ParseFloat(strings.Fields(val)[0], 64); err == nil {
			out[name] = v
		}
	}
	return out, sc.Err()
}

// rssStats summarises the samples taken so far.
type rssStats struct {
	Samples  int   `json:"samples"`
	Baseline int64 `json:"baselineBytes"` // first sample
	Peak     int64 `json:"peakBytes"`
	Last     int64 `json:"lastBytes"`
	PeakFDs  int64 `json:"peakFds"` // -1 when unknown
}

func (s *rssSampler) stats() rssStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := rssStats{Samples: len(s.samples), PeakFDs: -1}
	for i, sm := range s.samples {
		if i == 0 {
			st.Baseline = sm.rss
		}
		st.Peak = max(st.Peak, sm.rss)
		st.PeakFDs = max(st.PeakFDs, sm.fds)
		st.Last = sm.rss
	}
	return st
}

// latest is the most recent sample's RSS (0 without samples).
func (s *rssSampler) latest() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.samples) == 0 {
		return 0
	}
	return s.samples[len(s.samples)-1].rss
}

// meanSince averages the RSS samples taken at or after t.
func (s *rssSampler) meanSince(t time.Time) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var sum, n int64
	for _, sm := range s.samples {
		if !sm.at.Before(t) {
			sum += sm.rss
			n++
		}
	}
	if n == 0 {
		return 0
	}
	return sum / n
}

func (s *rssSampler) err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

func mb(b int64) string { return fmt.Sprintf("%.1f MB", float64(b)/(1<<20)) }
