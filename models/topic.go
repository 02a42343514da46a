package models

import "time"

// Topic is a row of mesh.topic: a named conversation in a mesh, unique on
// (mesh_id, name).
type Topic struct {
	ID          string          `gorm:"column:id;primaryKey"`
	MeshID      string          `gorm:"column:mesh_id"`
	Name        string          `gorm:"column:name"`
	Description *string         `gorm:"column:description"`
	Visibility  TopicVisibility `gorm:"column:visibility;default:public"`
	// CreatedByMemberID is set to NULL when that member is deleted.
	CreatedByMemberID *string `gorm:"column:created_by_member_id"`
	// EncryptedKeyPubkey is the ephemeral X25519 key that sealed members'
	// copies of the topic key; nil for a topic without encryption.
	EncryptedKeyPubkey *string    `gorm:"column:encrypted_key_pubkey"`
	CreatedAt          time.Time  `gorm:"column:created_at;default:now();autoCreateTime:false"`
	ArchivedAt         *time.Time `gorm:"column:archived_at"`
}

// TopicMember is a row of mesh.topic_member. The table has no primary key in
// the reference, only a unique index on (topic_id, member_id); the gorm tags
// treat that pair as the key so updates and deletes address one row.
type TopicMember struct {
	TopicID    string          `gorm:"column:topic_id;primaryKey"`
	MemberID   string          `gorm:"column:member_id;primaryKey"`
	Role       TopicMemberRole `gorm:"column:role;default:member"`
	JoinedAt   time.Time       `gorm:"column:joined_at;default:now()"`
	LastReadAt *time.Time      `gorm:"column:last_read_at"`
}

// TopicMemberKey is a row of mesh.topic_member_key: a topic's symmetric key
// sealed for one member; unique on (topic_id, member_id).
type TopicMemberKey struct {
	ID           string     `gorm:"column:id;primaryKey"`
	TopicID      string     `gorm:"column:topic_id"`
	MemberID     string     `gorm:"column:member_id"`
	EncryptedKey string     `gorm:"column:encrypted_key"`
	Nonce        string     `gorm:"column:nonce"`
	CreatedAt    time.Time  `gorm:"column:created_at;default:now();autoCreateTime:false"`
	RotatedAt    *time.Time `gorm:"column:rotated_at"`
}

// TopicMessage is a row of mesh.topic_message: persisted topic history.
type TopicMessage struct {
	ID                  string  `gorm:"column:id;primaryKey"`
	TopicID             string  `gorm:"column:topic_id"`
	SenderMemberID      string  `gorm:"column:sender_member_id"`
	SenderSessionPubkey *string `gorm:"column:sender_session_pubkey"`
	Nonce               string  `gorm:"column:nonce"`
	Ciphertext          string  `gorm:"column:ciphertext"`
	// BodyVersion is 1 for base64 plaintext, 2 for ciphertext under the topic
	// key. NOT NULL, default 1.
	BodyVersion int32 `gorm:"column:body_version;default:1"`
	// ReplyToID references another topic_message; set to NULL when that
	// message is deleted.
	ReplyToID *string   `gorm:"column:reply_to_id"`
	CreatedAt time.Time `gorm:"column:created_at;default:now();autoCreateTime:false"`
}

// Notification is a row of mesh.notification: one mention of a member in a
// topic message; unique on (message_id, recipient_member_id).
type Notification struct {
	ID                string     `gorm:"column:id;primaryKey"`
	MeshID            string     `gorm:"column:mesh_id"`
	TopicID           string     `gorm:"column:topic_id"`
	MessageID         string     `gorm:"column:message_id"`
	RecipientMemberID string     `gorm:"column:recipient_member_id"`
	SenderMemberID    string     `gorm:"column:sender_member_id"`
	Kind              string     `gorm:"column:kind;default:mention"`
	CreatedAt         time.Time  `gorm:"column:created_at;default:now();autoCreateTime:false"`
	ReadAt            *time.Time `gorm:"column:read_at"`
}
