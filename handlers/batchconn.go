package handlers

import (
	"bufio"
	"net"
	"sync"
)

// batchConn lets a socket's writer coalesce the frames of one batch into a
// few syscalls: between Hold and Release, writes (the writer's frames, and a
// pong the reader sends meanwhile) go to a buffer that Release flushes.
// Outside a batch every write goes straight through, so HTTP responses and
// the WebSocket handshake behave as on a plain connection. Without it a busy
// socket spends a large share of the broker's CPU in write(2), one call per
// frame.
type batchConn struct {
	net.Conn
	pool *sync.Pool // of *bufio.Writer, shared by the listener's connections; static

	mu   sync.Mutex // guards buf and held; taken by every Write
	buf  *bufio.Writer
	held bool
}

func (c *batchConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.held {
		return c.Conn.Write(p)
	}
	return c.buf.Write(p)
}

// Hold starts buffering writes.
func (c *batchConn) Hold() {
	c.mu.Lock()
	if c.buf == nil {
		c.buf = c.pool.Get().(*bufio.Writer)
		c.buf.Reset(c.Conn)
	}
	c.held = true
	c.mu.Unlock()
}

// Release flushes what was buffered and stops buffering. The buffer is
// dropped again so an idle socket holds none.
func (c *batchConn) Release() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.held = false
	if c.buf == nil {
		return nil
	}
	err := c.buf.Flush()
	c.buf.Reset(nil)
	c.pool.Put(c.buf)
	c.buf = nil
	return err
}

// batchListener wraps accepted connections in batchConn. Its buffers are
// shared by all of them: a buffer is only held for the length of one batch.
type batchListener struct {
	net.Listener
	pool *sync.Pool
}

func newBatchListener(ln net.Listener) batchListener {
	return batchListener{Listener: ln, pool: &sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 32<<10) }}}
}

func (l batchListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &batchConn{Conn: c, pool: l.pool}, nil
}
