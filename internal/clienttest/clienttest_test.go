package clienttest

import (
	"crypto/ed25519"
	"testing"

	"github.com/claudemesh/meshbroker/client"
)

// The knobs compose, in order, and reach the hello client.BuildHello (and
// so Connect) sends.
func TestKnobsCompose(t *testing.T) {
	_, k, _ := ed25519.GenerateKey(nil)
	id := client.Identity{MeshID: "m", MemberID: "x", Key: k}
	base := client.Options{SessionID: "s", Cwd: "/c", Pid: 1}
	var order []string
	opts := Mutate(base, func(m map[string]any) { order = append(order, "first"); m["pid"] = 2 })
	opts = Mutate(opts, func(m map[string]any) { order = append(order, "second"); m["pid"] = m["pid"].(int) * 10 })
	opts = Omit(opts, "cwd")
	opts = Extra(opts, map[string]any{"sessionPubkey": 5})
	opts = Extra(opts, map[string]any{"x": true})
	opts = NoPong(opts)
	h := client.BuildHello(id, opts)
	if _, has := h["cwd"]; has || h["pid"] != 20 || h["sessionPubkey"] != 5 || h["x"] != true || len(order) != 2 || order[0] != "first" {
		t.Fatalf("hello %v, mutations %v", h, order)
	}
	if plain := client.BuildHello(id, base); plain["cwd"] != "/c" || plain["pid"] != 1 {
		t.Fatalf("the base options changed: %v", plain)
	}
}
