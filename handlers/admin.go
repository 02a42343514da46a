package handlers

import (
	"net/http"
	"net/http/pprof"
)

// AdminHandler serves net/http/pprof under /debug/pprof/ for the opt-in
// admin listener (ADMIN_ADDR). It is a mux of its own, never mounted on the
// public port's routes: profiles name functions, goroutine dumps show
// peers' keys in arguments, and a CPU profile costs the broker CPU.
// Importing net/http/pprof registers on http.DefaultServeMux as a side
// effect; nothing serves that mux.
func AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
