package models

// Enum types of the reference schema. On Postgres each is a type in the mesh
// schema (mesh.role, mesh.presence_status, ...); on SQLite the column is TEXT
// with a CHECK listing the same values. pgEnums below is the single list both
// DDLs are built from.

// Role is mesh.role, a member's permission level.
type Role string

const (
	RoleAdmin  Role = "admin"
	RoleMember Role = "member"
)

// Visibility is mesh.visibility, for a mesh.
type Visibility string

const (
	VisibilityPrivate Visibility = "private"
	VisibilityPublic  Visibility = "public"
)

// Transport is mesh.transport.
type Transport string

const (
	TransportManaged    Transport = "managed"
	TransportTailscale  Transport = "tailscale"
	TransportSelfHosted Transport = "self_hosted"
)

// Tier is mesh.tier.
type Tier string

const (
	TierFree       Tier = "free"
	TierPro        Tier = "pro"
	TierTeam       Tier = "team"
	TierEnterprise Tier = "enterprise"
)

// MessagePriority is mesh.message_priority.
type MessagePriority string

const (
	PriorityNow  MessagePriority = "now"
	PriorityNext MessagePriority = "next"
	PriorityLow  MessagePriority = "low"
)

// PresenceStatus is mesh.presence_status. pending_status.status holds the
// same values in a plain text column.
type PresenceStatus string

const (
	StatusIdle    PresenceStatus = "idle"
	StatusWorking PresenceStatus = "working"
	StatusDND     PresenceStatus = "dnd"
)

// PresenceStatusSource is mesh.presence_status_source.
type PresenceStatusSource string

const (
	StatusSourceHook   PresenceStatusSource = "hook"
	StatusSourceManual PresenceStatusSource = "manual"
	StatusSourceJSONL  PresenceStatusSource = "jsonl"
)

// TopicVisibility is mesh.topic_visibility.
type TopicVisibility string

const (
	TopicPublic  TopicVisibility = "public"
	TopicPrivate TopicVisibility = "private"
	TopicDM      TopicVisibility = "dm"
)

// TopicMemberRole is mesh.topic_member_role (advisory only).
type TopicMemberRole string

const (
	TopicRoleLead     TopicMemberRole = "lead"
	TopicRoleMember   TopicMemberRole = "member"
	TopicRoleObserver TopicMemberRole = "observer"
)

// PresenceRole is presence.role. The column is plain text in the reference
// (migration 0029), not an enum, so no database check enforces these.
type PresenceRole string

const (
	PresenceRoleControlPlane PresenceRole = "control-plane" // a daemon's long-lived socket
	PresenceRoleSession      PresenceRole = "session"       // one Claude Code session (the default)
	PresenceRoleService      PresenceRole = "service"       // a bot or service attached to the mesh
)

// Values of member.message_mode, a nullable text column defaulting to push.
const (
	MessageModePush  = "push"  // deliver in real time
	MessageModeInbox = "inbox" // hold for the member
	MessageModeOff   = "off"   // the member polls
)

type enumDef struct {
	name   string // type name inside the mesh schema
	values []string
}

// pgEnums lists the enum types our tables use, in the reference's label order
// (Postgres compares enum values by that order).
func pgEnums() []enumDef {
	return []enumDef{
		{"role", []string{string(RoleAdmin), string(RoleMember)}},
		{"tier", []string{string(TierFree), string(TierPro), string(TierTeam), string(TierEnterprise)}},
		{"transport", []string{string(TransportManaged), string(TransportTailscale), string(TransportSelfHosted)}},
		{"visibility", []string{string(VisibilityPrivate), string(VisibilityPublic)}},
		{"message_priority", []string{string(PriorityNow), string(PriorityNext), string(PriorityLow)}},
		{"presence_status", []string{string(StatusIdle), string(StatusWorking), string(StatusDND)}},
		{"presence_status_source", []string{string(StatusSourceHook), string(StatusSourceManual), string(StatusSourceJSONL)}},
		{"topic_visibility", []string{string(TopicPublic), string(TopicPrivate), string(TopicDM)}},
		{"topic_member_role", []string{string(TopicRoleLead), string(TopicRoleMember), string(TopicRoleObserver)}},
	}
}
