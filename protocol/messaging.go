package protocol

import "encoding/json"

// Frames of the messaging area (02).

// Send is the `send` frame. The idempotency fields are snake_case on the
// wire, unlike everything else.
type Send struct {
	TargetSpec         json.RawMessage `json:"targetSpec"`
	Priority           json.RawMessage `json:"priority"`
	Nonce              json.RawMessage `json:"nonce"`
	Ciphertext         json.RawMessage `json:"ciphertext"`
	ClientMessageID    json.RawMessage `json:"client_message_id"`
	RequestFingerprint json.RawMessage `json:"request_fingerprint"`
	ReplyToID          json.RawMessage `json:"replyToId"`
	Mentions           json.RawMessage `json:"mentions"`
	BodyVersion        json.RawMessage `json:"bodyVersion"`
}

// Push is a drained queue row (02 §6.1).
type Push struct {
	Type               string `json:"type"`
	MessageID          string `json:"messageId"`
	MeshID             string `json:"meshId"`
	SenderPubkey       string `json:"senderPubkey"`
	Priority           string `json:"priority"`
	Nonce              string `json:"nonce"`
	Ciphertext         string `json:"ciphertext"`
	CreatedAt          string `json:"createdAt"`
	ClientMessageID    string `json:"client_message_id,omitempty"`
	RequestFingerprint string `json:"request_fingerprint,omitempty"`
}

// MulticastPush is a live `*`, `@all`, `@group` or `#topic` push (02 §6.2).
type MulticastPush struct {
	Type               string `json:"type"`
	MessageID          string `json:"messageId"`
	MeshID             string `json:"meshId"`
	SenderPubkey       string `json:"senderPubkey"`
	SenderMemberPubkey string `json:"senderMemberPubkey"`
	SenderMemberID     string `json:"senderMemberId"`
	SenderName         string `json:"senderName"`
	Priority           string `json:"priority"`
	Nonce              string `json:"nonce"`
	Ciphertext         string `json:"ciphertext"`
	CreatedAt          string `json:"createdAt"`
	Topic              string `json:"topic,omitempty"`
	ReplyToID          string `json:"replyToId,omitempty"`
}

// ClientAck is `client_ack`: camelCase ids, either may be absent.
type ClientAck struct {
	ClientMessageID json.RawMessage `json:"clientMessageId"`
	BrokerMessageID json.RawMessage `json:"brokerMessageId"`
}

// MessageStatus is the `message_status` request.
type MessageStatus struct {
	MessageID json.RawMessage `json:"messageId"`
}

// Recipient is one entry of message_status_result.recipients.
type Recipient struct {
	Name   string `json:"name"`
	Pubkey string `json:"pubkey"`
	Status string `json:"status"`
}

// MessageStatusResult answers message_status.
type MessageStatusResult struct {
	Type        string      `json:"type"`
	MessageID   string      `json:"messageId"`
	TargetSpec  string      `json:"targetSpec"`
	Delivered   bool        `json:"delivered"`
	DeliveredAt *string     `json:"deliveredAt"`
	Recipients  []Recipient `json:"recipients"`
	ReqID       string      `json:"_reqId,omitempty"`
}

// GroupChange is join_group / leave_group.
type GroupChange struct {
	Name json.RawMessage `json:"name"`
	Role json.RawMessage `json:"role"`
}

// TopicCreate is topic_create.
type TopicCreate struct {
	Name        json.RawMessage `json:"name"`
	Description json.RawMessage `json:"description"`
	Visibility  json.RawMessage `json:"visibility"`
}

// TopicRef is topic_join / topic_leave.
type TopicRef struct {
	Topic json.RawMessage `json:"topic"`
	Role  json.RawMessage `json:"role"`
}

// TopicSummary is topic_created.topic.
type TopicSummary struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	Visibility string `json:"visibility"`
}

// TopicCreated answers topic_create.
type TopicCreated struct {
	Type    string       `json:"type"`
	Topic   TopicSummary `json:"topic"`
	Created bool         `json:"created"`
	ReqID   string       `json:"_reqId,omitempty"`
}

// TopicListEntry is one topic of topic_list_response.
type TopicListEntry struct {
	ID          string  `json:"id"`
	Name        string  `json:"name"`
	Description *string `json:"description"`
	Visibility  string  `json:"visibility"`
	MemberCount int     `json:"memberCount"`
	CreatedAt   string  `json:"createdAt"`
}

// TopicList answers topic_list.
type TopicList struct {
	Type   string           `json:"type"`
	Topics []TopicListEntry `json:"topics"`
	ReqID  string           `json:"_reqId,omitempty"`
}
