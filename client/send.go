package client

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"strconv"

	"github.com/claudemesh/meshbroker/protocol"
)

// SendRequest is a send frame's content (02 §1.1).
type SendRequest struct {
	// TargetSpec addresses the message; see the package documentation for
	// its forms (a key in hex, a display name, "*", "@group", "#topicId").
	TargetSpec string
	// Priority of the message; empty leaves the field out, and the broker
	// stores PriorityNext.
	Priority Priority
	// Nonce and Ciphertext are the base64 envelope, stored and forwarded
	// as they are: crypto_box for a DM (Seal), base64 of the plaintext for
	// multicast (SendMulticast).
	Nonce, Ciphertext string
	// ClientMessageID makes the send idempotent: a retry with the same id
	// (and the same RequestFingerprint, if any) gets the first ack again
	// instead of a second message.
	ClientMessageID    string
	RequestFingerprint string // 64 hex SHA-256 of the canonical request, optional
	ReplyToID          string // a topic post's parent message id, optional
	ID                 string // correlation id; empty: generated
}

// Send sends a message and waits for its ack. A send the broker refused
// returns its ack (ack.Error holds the broker's text) and a *SendError; a
// socket lost before the ack returns ErrConnectionLost, and the message
// may or may not have been stored (retry with the same ClientMessageID).
func (c *Client) Send(ctx context.Context, r SendRequest) (protocol.Ack, error) {
	if r.ID == "" {
		r.ID = "s" + strconv.FormatUint(c.nextID.Add(1), 10) + "-" + randomHex(4)
	}
	f := map[string]any{"type": "send", "id": r.ID, "targetSpec": r.TargetSpec, "nonce": r.Nonce, "ciphertext": r.Ciphertext}
	if r.Priority != "" {
		f["priority"] = string(r.Priority)
	}
	if r.ClientMessageID != "" {
		f["client_message_id"] = r.ClientMessageID
	}
	if r.RequestFingerprint != "" {
		f["request_fingerprint"] = r.RequestFingerprint
	}
	if r.ReplyToID != "" {
		f["replyToId"] = r.ReplyToID
	}
	reply, err := c.await(ctx, "id:"+r.ID, f)
	if err != nil {
		return protocol.Ack{}, err
	}
	var ack protocol.Ack
	if err := reply.Decode(&ack); err != nil {
		return ack, err
	}
	if reply.Type == "error" {
		var e protocol.ErrorFrame
		_ = reply.Decode(&e)
		return ack, &SendError{ID: r.ID, Code: string(e.Code), Message: e.Message}
	}
	if !ack.Queued {
		text := ack.Error
		if text == "" {
			text = "ack without queued:true"
		}
		return ack, sendErrorFromAck(r.ID, text)
	}
	return ack, nil
}

// signingKey is the key this client seals with and is known by: the
// session key on a session connection, else the member key.
func (c *Client) signingKey() ed25519.PrivateKey {
	if c.Opts.Session != nil {
		return c.Opts.Session.Key
	}
	return c.ID.Key
}

// SendSealed encrypts plaintext for recipient (crypto_box from this
// connection's key, see Seal) and sends it to target, normally the hex of
// recipient itself.
func (c *Client) SendSealed(ctx context.Context, target string, recipient ed25519.PublicKey, priority Priority, plaintext []byte) (protocol.Ack, error) {
	nonce, ct, err := Seal(plaintext, recipient, c.signingKey())
	if err != nil {
		return protocol.Ack{}, err
	}
	return c.Send(ctx, SendRequest{TargetSpec: target, Priority: priority, Nonce: nonce, Ciphertext: ct})
}

// SendDirect sends a DM sealed to recipient, addressed by its hex key: a
// member key reaches one of that member's connections, a session key the
// one connection holding it.
func (c *Client) SendDirect(ctx context.Context, recipient ed25519.PublicKey, priority Priority, plaintext []byte) (protocol.Ack, error) {
	return c.SendSealed(ctx, hex.EncodeToString(recipient), recipient, priority, plaintext)
}

// SendMulticast sends plaintext to "*", "@all", "@<group>" or "#<topicId>"
// the way the claudemesh CLI does: base64 of the plaintext with a random
// nonce, not encrypted, since there is no single recipient key. Every
// recipient, and the broker, can read it.
func (c *Client) SendMulticast(ctx context.Context, target string, priority Priority, plaintext []byte) (protocol.Ack, error) {
	var nonce [24]byte
	_, _ = rand.Read(nonce[:])
	return c.Send(ctx, SendRequest{
		TargetSpec: target, Priority: priority,
		Nonce: base64.StdEncoding.EncodeToString(nonce[:]), Ciphertext: base64.StdEncoding.EncodeToString(plaintext),
	})
}

// ClientAck acknowledges a push by its ids (either may be empty). Receive
// does this itself unless Options.ManualAck is set; see also Ack.
func (c *Client) ClientAck(brokerMessageID, clientMessageID string) error {
	f := map[string]any{"type": "client_ack"}
	if brokerMessageID != "" {
		f["brokerMessageId"] = brokerMessageID
	}
	if clientMessageID != "" {
		f["clientMessageId"] = clientMessageID
	}
	return c.WriteJSON(f)
}
