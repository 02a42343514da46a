package main

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/claudemesh/meshbroker/client"
)

// brokerSocketGoroutines counts, across every goroutine, those running a
// socket's reader, a socket's writer, or an HTTP connection's server loop.
func brokerSocketGoroutines() (readers, writers, httpConns int) {
	buf := make([]byte, 8<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	for _, g := range strings.Split(stacks, "\n\n") {
		switch {
		case strings.Contains(g, "github.com/claudemesh/meshbroker/handlers.(*wsConn).serve("):
			readers++
		case strings.Contains(g, "github.com/claudemesh/meshbroker/handlers.(*wsConn).writeRun("):
			writers++
		case strings.Contains(g, "net/http.(*conn).serve("):
			httpConns++
		}
	}
	return
}

// An idle authenticated socket holds one goroutine, its reader: the HTTP
// handler returned after the upgrade, and the writer exits once it has
// written what was queued (here a DM, its confirmation ping and the join
// announcements), so idle memory stays a reader's stack and a few structs.
func TestIdleSocketHoldsOnlyItsReader(t *testing.T) {
	// Not parallel: it counts every socket goroutine in the process.
	b := startTestBroker(t)
	f := b.fixture()
	const n = 20
	clients := make([]*client.Client, n)
	first := client.NewSession()
	for i := range clients {
		s := client.NewSession()
		if i == 0 {
			s = first
		}
		clients[i] = b.connect(f.a, client.Options{Session: &s})
	}
	bob := b.connect(f.b, client.Options{})
	ack, err := bob.Send(ctxT(t), client.SendRequest{TargetSpec: first.Pubkey(), Priority: "now", Nonce: "", Ciphertext: "x"})
	if err != nil || ack.MessageID == "" {
		t.Fatalf("send: %+v %v", ack, err)
	}
	waitFrame(t, clients[0], 10*time.Second, isMessage)

	var got string
	waitFor(t, 10*time.Second, "idle sockets to hold only their readers", func() bool {
		r, w, h := brokerSocketGoroutines()
		got = fmt.Sprintf("%d readers, %d writers, %d HTTP connection loops", r, w, h)
		return r == n+1 && w == 0 && h == 0
	})
	t.Log(got)
}
