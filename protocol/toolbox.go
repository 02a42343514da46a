package protocol

import "encoding/json"

// Frames of the shared toolbox: memory, tasks, scheduled messages, contexts,
// skills and vault, with the reference broker's field names. Inbound fields
// are typed: a value of the wrong JSON type fails decoding, which the edge
// answers invalid_argument. _reqId is echoed when the request had one.

// Toolbox error codes of the reference; meshbroker's caps answer
// CodeLimitExceeded.
const (
	CodeTaskNotClaimable Code = "task_not_claimable"
	CodeTaskNotFound     Code = "task_not_found"
	CodeInvalidCron      Code = "invalid_cron"
	CodeVaultError       Code = "vault_error"
)

// Remember is {"type":"remember","content","tags"?}.
type Remember struct {
	Content *string  `json:"content"`
	Tags    []string `json:"tags"`
}

// MemoryStored answers remember. MemoryID repeats ID: the CLI's daemon reads
// memoryId where its cold path and the reference use id.
type MemoryStored struct {
	Type     string `json:"type"` // "memory_stored"
	ID       string `json:"id"`
	MemoryID string `json:"memoryId"`
	ReqID    string `json:"_reqId,omitempty"`
}

// Recall is {"type":"recall","query"}.
type Recall struct {
	Query *string `json:"query"`
}

// MemoryView is one recalled memory.
type MemoryView struct {
	ID           string   `json:"id"`
	Content      string   `json:"content"`
	Tags         []string `json:"tags"`
	RememberedBy string   `json:"rememberedBy"`
	RememberedAt string   `json:"rememberedAt"`
}

// MemoryResults answers recall (the reference's frame).
type MemoryResults struct {
	Type     string       `json:"type"` // "memory_results"
	Memories []MemoryView `json:"memories"`
	ReqID    string       `json:"_reqId,omitempty"`
}

// MemoryRecallResult is the same answer in the shape the CLI's daemon
// awaits; the broker sends it right after memory_results.
type MemoryRecallResult struct {
	Type    string       `json:"type"` // "memory_recall_result"
	Matches []MemoryView `json:"matches"`
	ReqID   string       `json:"_reqId,omitempty"`
}

// Forget is {"type":"forget","memoryId"}.
type Forget struct {
	MemoryID *string `json:"memoryId"`
}

// ForgetAck answers forget as the reference does: an ack naming the memory.
type ForgetAck struct {
	Type      string `json:"type"` // "ack"
	ID        string `json:"id"`
	MessageID string `json:"messageId"`
	Queued    bool   `json:"queued"`
	ReqID     string `json:"_reqId,omitempty"`
}

// CreateTask is {"type":"create_task","title","assignee"?,"priority"?,"tags"?}.
type CreateTask struct {
	Title    *string  `json:"title"`
	Assignee *string  `json:"assignee"`
	Priority *string  `json:"priority"`
	Tags     []string `json:"tags"`
}

// TaskCreated answers create_task.
type TaskCreated struct {
	Type  string `json:"type"` // "task_created"
	ID    string `json:"id"`
	ReqID string `json:"_reqId,omitempty"`
}

// TaskRef is claim_task and complete_task: {"taskId","result"?}.
type TaskRef struct {
	TaskID *string `json:"taskId"`
	Result *string `json:"result"`
}

// ListTasks is {"type":"list_tasks","status"?,"assignee"?}.
type ListTasks struct {
	Status   *string `json:"status"`
	Assignee *string `json:"assignee"`
}

// TaskView is one task of a task_list.
type TaskView struct {
	ID        string   `json:"id"`
	Title     string   `json:"title"`
	Assignee  *string  `json:"assignee"`
	ClaimedBy *string  `json:"claimedBy"`
	Status    string   `json:"status"`
	Priority  string   `json:"priority"`
	CreatedBy *string  `json:"createdBy"`
	Tags      []string `json:"tags"`
	CreatedAt string   `json:"createdAt"`
}

// TaskList answers list_tasks, claim_task and complete_task.
type TaskList struct {
	Type  string     `json:"type"` // "task_list"
	Tasks []TaskView `json:"tasks"`
	ReqID string     `json:"_reqId,omitempty"`
}

// Schedule is {"type":"schedule","to","message","deliverAt"?,"cron"?,"subtype"?}.
// deliverAt is Unix milliseconds; with cron it is ignored.
type Schedule struct {
	To        *string  `json:"to"`
	Message   *string  `json:"message"`
	DeliverAt *float64 `json:"deliverAt"`
	Cron      *string  `json:"cron"`
	Subtype   *string  `json:"subtype"`
}

// ScheduledAck answers schedule.
type ScheduledAck struct {
	Type        string `json:"type"` // "scheduled_ack"
	ScheduledID string `json:"scheduledId"`
	DeliverAt   int64  `json:"deliverAt"`
	Cron        string `json:"cron,omitempty"`
	ReqID       string `json:"_reqId,omitempty"`
}

// ScheduledView is one pending schedule; cron and firedCount only for cron rows.
type ScheduledView struct {
	ID         string `json:"id"`
	To         string `json:"to"`
	Message    string `json:"message"`
	DeliverAt  int64  `json:"deliverAt"`
	CreatedAt  int64  `json:"createdAt"`
	Cron       string `json:"cron,omitempty"`
	FiredCount *int   `json:"firedCount,omitempty"`
}

// ScheduledList answers list_scheduled.
type ScheduledList struct {
	Type     string          `json:"type"` // "scheduled_list"
	Messages []ScheduledView `json:"messages"`
	ReqID    string          `json:"_reqId,omitempty"`
}

// CancelScheduled is {"type":"cancel_scheduled","scheduledId"}.
type CancelScheduled struct {
	ScheduledID *string `json:"scheduledId"`
}

// CancelScheduledAck answers cancel_scheduled; ok is false for an id that
// is not a pending schedule of the caller's.
type CancelScheduledAck struct {
	Type        string `json:"type"` // "cancel_scheduled_ack"
	ScheduledID string `json:"scheduledId"`
	OK          bool   `json:"ok"`
	ReqID       string `json:"_reqId,omitempty"`
}

// ShareContext is {"type":"share_context","summary","filesRead"?,"keyFindings"?,"tags"?}.
type ShareContext struct {
	Summary     *string  `json:"summary"`
	FilesRead   []string `json:"filesRead"`
	KeyFindings []string `json:"keyFindings"`
	Tags        []string `json:"tags"`
}

// ContextShared answers share_context.
type ContextShared struct {
	Type  string `json:"type"` // "context_shared"
	ID    string `json:"id"`
	ReqID string `json:"_reqId,omitempty"`
}

// GetContext is {"type":"get_context","query"}.
type GetContext struct {
	Query *string `json:"query"`
}

// ContextView is one shared context; FilesRead and KeyFindings only in
// context_results.
type ContextView struct {
	PeerName    string    `json:"peerName"`
	Summary     string    `json:"summary"`
	FilesRead   *[]string `json:"filesRead,omitempty"`
	KeyFindings *[]string `json:"keyFindings,omitempty"`
	Tags        []string  `json:"tags"`
	UpdatedAt   string    `json:"updatedAt"`
}

// ContextResults answers get_context ("context_results") and list_contexts
// ("context_list").
type ContextResults struct {
	Type     string        `json:"type"`
	Contexts []ContextView `json:"contexts"`
	ReqID    string        `json:"_reqId,omitempty"`
}

// ShareSkill is {"type":"share_skill","name","description","instructions","tags"?,"manifest"?}.
type ShareSkill struct {
	Name         *string         `json:"name"`
	Description  *string         `json:"description"`
	Instructions *string         `json:"instructions"`
	Tags         []string        `json:"tags"`
	Manifest     json.RawMessage `json:"manifest"`
}

// SkillRef is get_skill and remove_skill: {"name"}.
type SkillRef struct {
	Name *string `json:"name"`
}

// ListSkills is {"type":"list_skills","query"?}.
type ListSkills struct {
	Query *string `json:"query"`
}

// SkillAck answers share_skill ("shared") and remove_skill ("removed",
// "not_found").
type SkillAck struct {
	Type   string `json:"type"` // "skill_ack"
	Name   string `json:"name"`
	Action string `json:"action"`
	ReqID  string `json:"_reqId,omitempty"`
}

// SkillView is one skill; Instructions and Manifest only in skill_data.
type SkillView struct {
	Name         string          `json:"name"`
	Description  string          `json:"description"`
	Instructions *string         `json:"instructions,omitempty"`
	Tags         []string        `json:"tags"`
	Author       string          `json:"author"`
	Manifest     json.RawMessage `json:"manifest,omitempty"`
	CreatedAt    string          `json:"createdAt"`
}

// SkillData answers get_skill; Skill is null when there is none.
type SkillData struct {
	Type  string     `json:"type"` // "skill_data"
	Skill *SkillView `json:"skill"`
	ReqID string     `json:"_reqId,omitempty"`
}

// SkillList answers list_skills.
type SkillList struct {
	Type   string      `json:"type"` // "skill_list"
	Skills []SkillView `json:"skills"`
	ReqID  string      `json:"_reqId,omitempty"`
}

// VaultSet is {"type":"vault_set","key","ciphertext","nonce","sealed_key","entry_type"?,"mount_path"?,"description"?}.
type VaultSet struct {
	Key         *string `json:"key"`
	Ciphertext  *string `json:"ciphertext"`
	Nonce       *string `json:"nonce"`
	SealedKey   *string `json:"sealed_key"`
	EntryType   *string `json:"entry_type"`
	MountPath   *string `json:"mount_path"`
	Description *string `json:"description"`
}

// VaultKey is vault_delete: {"key"}.
type VaultKey struct {
	Key *string `json:"key"`
}

// VaultGet is {"type":"vault_get","keys"}.
type VaultGet struct {
	Keys []string `json:"keys"`
}

// VaultAck answers vault_set ("stored") and vault_delete ("deleted", "not_found").
type VaultAck struct {
	Type   string `json:"type"` // "vault_ack"
	Key    string `json:"key"`
	Action string `json:"action"`
	ReqID  string `json:"_reqId,omitempty"`
}

// VaultEntryView is one vault entry: metadata in vault_list_result, the
// sealed value too in vault_get_result.
type VaultEntryView struct {
	Key         string  `json:"key"`
	Ciphertext  *string `json:"ciphertext,omitempty"`
	Nonce       *string `json:"nonce,omitempty"`
	SealedKey   *string `json:"sealed_key,omitempty"`
	EntryType   *string `json:"entry_type"`
	MountPath   *string `json:"mount_path"`
	Description *string `json:"description,omitempty"`
	UpdatedAt   string  `json:"updated_at,omitempty"`
}

// VaultEntries answers vault_list ("vault_list_result") and vault_get
// ("vault_get_result").
type VaultEntries struct {
	Type    string           `json:"type"`
	Entries []VaultEntryView `json:"entries"`
	ReqID   string           `json:"_reqId,omitempty"`
}
