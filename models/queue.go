package models

import "time"

// MessageQueue is a row of mesh.message_queue: one accepted send, holding
// only ciphertext and routing data. The primary key is the table's only index.
type MessageQueue struct {
	ID                  string  `gorm:"column:id;primaryKey"`
	MeshID              string  `gorm:"column:mesh_id"`
	SenderMemberID      string  `gorm:"column:sender_member_id"`
	SenderSessionPubkey *string `gorm:"column:sender_session_pubkey"`
	// TargetSpec is the target as received: a pubkey, "*", "@group" or
	// "#topicId".
	TargetSpec  string          `gorm:"column:target_spec"`
	Priority    MessagePriority `gorm:"column:priority;default:next"`
	Nonce       string          `gorm:"column:nonce"`
	Ciphertext  string          `gorm:"column:ciphertext"`
	CreatedAt   time.Time       `gorm:"column:created_at;default:now();autoCreateTime:false"`
	DeliveredAt *time.Time      `gorm:"column:delivered_at"`
	// ExpiresAt exists in the schema but the reference never sets or reads it.
	ExpiresAt          *time.Time `gorm:"column:expires_at"`
	ClientMessageID    *string    `gorm:"column:client_message_id"`
	RequestFingerprint *string    `gorm:"column:request_fingerprint"`
	// ClaimedAt, ClaimID and ClaimExpiresAt are the drain lease of migration
	// 0029; ClaimID is the claimer's presence id, kept for debugging.
	ClaimedAt      *time.Time `gorm:"column:claimed_at"`
	ClaimID        *string    `gorm:"column:claim_id"`
	ClaimExpiresAt *time.Time `gorm:"column:claim_expires_at"`
}
