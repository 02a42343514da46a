package handlers

import (
	"net"
	"testing"
	"time"
)

// Writes pass straight through outside a batch and are held until Release
// inside one.
func TestBatchConnHoldsUntilRelease(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	ln := newBatchListener(nil)
	bc := &batchConn{Conn: server, pool: ln.pool}
	got := make(chan string, 4)
	go func() {
		buf := make([]byte, 64)
		for {
			n, err := client.Read(buf)
			if err != nil {
				close(got)
				return
			}
			got <- string(buf[:n])
		}
	}()
	if _, err := bc.Write([]byte("direct")); err != nil {
		t.Fatal(err)
	}
	if s := <-got; s != "direct" {
		t.Fatalf("got %q", s)
	}
	bc.Hold()
	_, _ = bc.Write([]byte("a"))
	_, _ = bc.Write([]byte("b"))
	select {
	case s := <-got:
		t.Fatalf("%q written before Release", s)
	case <-time.After(50 * time.Millisecond):
	}
	if err := bc.Release(); err != nil {
		t.Fatal(err)
	}
	if s := <-got; s != "ab" {
		t.Fatalf("batch arrived as %q", s)
	}
	server.Close()
	for range got { // the reader ends with the pipe
	}
}
