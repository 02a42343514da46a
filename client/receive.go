package client

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/claudemesh/meshbroker/protocol"
)

// ErrUnreadable is wrapped by Receive's error for a message push it could
// not read: a malformed sender key, a DM that opens with neither of this
// client's keys, a multicast body that is not base64. The Message is still
// returned with what could be decoded.
var ErrUnreadable = errors.New("client: unreadable message")

// Message is a received message, opened.
type Message struct {
	ID              string // the broker's messageId: the queue row (a topic_message id for topic posts)
	ClientMessageID string // the sender's client_message_id, when it set one
	MeshID          string
	// Sender is the sending connection's key: its session key, or its
	// member key for a member connection. Reply to it with SendDirect.
	Sender ed25519.PublicKey
	// SenderMember and SenderName are set for multicast only (a DM push
	// carries neither).
	SenderMember ed25519.PublicKey
	SenderName   string
	Priority     Priority
	CreatedAt    time.Time
	Plaintext    []byte
	// Direct is true for a DM (a crypto_box opened with one of our keys),
	// false for "*", "@all", "@group" and "#topic" multicast.
	Direct bool
	// Recipient is the key of ours a DM was sealed to, in hex: our session
	// key or our member key. Empty for multicast.
	Recipient string
	Topic     string // topic name, for topic posts
	ReplyToID string
	Raw       json.RawMessage // the push as received
}

// pushFrame is a push of any kind (02 §6.1, §6.2, 01 §8).
type pushFrame struct {
	Subtype            string `json:"subtype"`
	MessageID          string `json:"messageId"`
	MeshID             string `json:"meshId"`
	SenderPubkey       string `json:"senderPubkey"`
	SenderMemberPubkey string `json:"senderMemberPubkey"`
	SenderName         string `json:"senderName"`
	Priority           string `json:"priority"`
	Nonce              string `json:"nonce"`
	Ciphertext         string `json:"ciphertext"`
	CreatedAt          string `json:"createdAt"`
	Topic              string `json:"topic"`
	ReplyToID          string `json:"replyToId"`
	ClientMessageID    string `json:"client_message_id"`
}

// recvState drops DMs Receive has already returned: a connection that
// acks is given an unacked DM again after a reconnect or a claim expiry
// (at-least-once, 02 §5), so the same id can arrive twice.
type recvState struct {
	mu   sync.Mutex
	seen map[string]struct{}
	ring []string // the same ids, oldest first, at most recvRemember
}

const recvRemember = 4096

// firstTime records id and reports whether it is new.
func (r *recvState) firstTime(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.seen[id]; ok {
		return false
	}
	if r.seen == nil {
		r.seen = make(map[string]struct{}, recvRemember)
	}
	if len(r.ring) == recvRemember {
		delete(r.seen, r.ring[0])
		r.ring = r.ring[1:]
	}
	r.seen[id] = struct{}{}
	r.ring = append(r.ring, id)
	return true
}

// Receive returns the next message addressed to this client, across
// reconnects: a DM opened with the key it was sealed to (the session key
// when the sender addressed this session, the member key when it addressed
// the member; the push does not say which, so both are tried, session key
// first), or a multicast push with its base64 body decoded. System pushes
// (peer_joined, ...) and other frames are skipped; read them with Next,
// which consumes the same stream.
//
// Unless Options.ManualAck is set, every DM is acknowledged with
// client_ack before Receive returns it (multicast needs no ack: the broker
// stores it delivered). A DM seen before is acknowledged again and not
// returned twice. A message push that cannot be read comes back with an
// error wrapping ErrUnreadable (and is acknowledged all the same: it would
// not read any better later).
func (c *Client) Receive(ctx context.Context) (Message, error) {
	for {
		f, err := c.Next(ctx)
		if err != nil {
			return Message{}, err
		}
		if f.Type != "push" {
			continue
		}
		var p pushFrame
		if err := f.Decode(&p); err != nil {
			return Message{Raw: f.Raw}, fmt.Errorf("%w: decode push: %v", ErrUnreadable, err)
		}
		if p.Subtype == "system" {
			continue
		}
		m, err := c.open(p, f.Raw)
		if m.Direct && m.ID != "" {
			if !c.Opts.ManualAck {
				_ = c.Ack(m) // a lost ack means a redelivery, which the filter drops
			}
			if !c.recv.firstTime(m.ID) {
				continue
			}
		}
		return m, err
	}
}

// Ack sends the client_ack for m (needed only with Options.ManualAck).
func (c *Client) Ack(m Message) error {
	return c.ClientAck(m.ID, m.ClientMessageID)
}

// open builds the Message of a push and reads its body.
func (c *Client) open(p pushFrame, raw json.RawMessage) (Message, error) {
	m := Message{
		ID: p.MessageID, ClientMessageID: p.ClientMessageID, MeshID: p.MeshID, SenderName: p.SenderName,
		Priority: Priority(p.Priority), Topic: p.Topic, ReplyToID: p.ReplyToID, Raw: raw,
		Direct: p.SenderMemberPubkey == "", // only multicast pushes name the sender's member (02 §6.2)
	}
	m.CreatedAt, _ = time.Parse(time.RFC3339Nano, p.CreatedAt)
	sender, err := decodeKey(p.SenderPubkey)
	if err != nil {
		return m, fmt.Errorf("%w: senderPubkey: %v", ErrUnreadable, err)
	}
	m.Sender = sender
	if !m.Direct {
		if m.SenderMember, err = decodeKey(p.SenderMemberPubkey); err != nil {
			return m, fmt.Errorf("%w: senderMemberPubkey: %v", ErrUnreadable, err)
		}
		if m.Plaintext, err = base64.StdEncoding.DecodeString(p.Ciphertext); err != nil {
			return m, fmt.Errorf("%w: multicast body is not base64", ErrUnreadable)
		}
		return m, nil
	}
	keys := []ed25519.PrivateKey{c.ID.Key}
	if c.Opts.Session != nil {
		keys = []ed25519.PrivateKey{c.Opts.Session.Key, c.ID.Key}
	}
	for _, k := range keys {
		if pt, err := Open(p.Nonce, p.Ciphertext, sender, k); err == nil {
			m.Plaintext, m.Recipient = pt, protocol.PubkeyHex(k)
			return m, nil
		}
	}
	return m, fmt.Errorf("%w: DM %s from %s opens with none of this client's keys", ErrUnreadable, p.MessageID, p.SenderPubkey)
}

func decodeKey(s string) (ed25519.PublicKey, error) {
	if !protocol.IsLowerHex(s, 64) {
		return nil, fmt.Errorf("%q is not 64 lowercase hex characters", s)
	}
	b, _ := hex.DecodeString(s)
	return ed25519.PublicKey(b), nil
}
