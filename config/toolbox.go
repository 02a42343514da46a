package config

import (
	"time"
)

// Toolbox holds the limits of the shared toolbox (memory, tasks, scheduled
// messages, contexts, skills, vault). Counts are per mesh unless named per
// member; a frame that would exceed one is refused with an error frame and
// changes nothing.
type Toolbox struct {
	MaxMemories           int // TOOLBOX_MAX_MEMORIES, default 20000: live (not forgotten) memories per mesh
	MaxTasks              int // TOOLBOX_MAX_TASKS, default 5000: tasks per mesh, done ones included
	MaxSchedules          int // TOOLBOX_MAX_SCHEDULES, default 1000: pending schedules per mesh
	MaxSchedulesPerMember int // TOOLBOX_MAX_SCHEDULES_PER_MEMBER, default 100: pending schedules per member
	MaxSkills             int // TOOLBOX_MAX_SKILLS, default 500: skills per mesh
	MaxVaultEntries       int // TOOLBOX_MAX_VAULT_ENTRIES, default 200: vault entries per member
	MaxItemBytes          int // TOOLBOX_MAX_ITEM_BYTES, default 16384: one memory, title, summary, message, skill body or vault value
	MaxTags               int // default 32: tags (and files, findings) per item, each at most 256 bytes

	// Scheduling. Fixed limits: a schedule fires at most once a minute and
	// at most a year ahead.
	ScheduleHorizon   time.Duration // default 366 days: furthest accepted deliverAt
	ScheduleMinPeriod time.Duration // default 1 min: a cron firing more often is refused
	SchedulePoll      time.Duration // default 15 s: the scheduler re-reads due rows at least this often (other brokers' schedules)
	ScheduleLate      time.Duration // default 30 s: a fire this far past its time is flagged late
	ScheduleFireBatch int           // default 256: due rows fired per round

	// Forgotten memories and fired or cancelled one-shot schedules are kept
	// (as in the reference) for PurgeAfter, then deleted, so that cycles of
	// remember/forget or schedule/cancel cannot grow the tables without bound.
	PurgeAfter    time.Duration // default 7 days
	PurgeInterval time.Duration // default 1 h
}

// DefaultToolbox returns the toolbox defaults.
func DefaultToolbox() Toolbox {
	return Toolbox{
		MaxMemories:           20000,
		MaxTasks:              5000,
		MaxSchedules:          1000,
		MaxSchedulesPerMember: 100,
		MaxSkills:             500,
		MaxVaultEntries:       200,
		MaxItemBytes:          16384,
		MaxTags:               32,
		ScheduleHorizon:       366 * 24 * time.Hour,
		ScheduleMinPeriod:     time.Minute,
		SchedulePoll:          15 * time.Second,
		ScheduleLate:          30 * time.Second,
		ScheduleFireBatch:     256,
		PurgeAfter:            7 * 24 * time.Hour,
		PurgeInterval:         time.Hour,
	}
}

// toolboxVars extend vars.
var toolboxVars = []envVar{
	{name: "TOOLBOX_MAX_MEMORIES", accepts: "an integer 1-1000000", help: "live memories per mesh",
		def: showInt(func(c Config) int { return c.Toolbox.MaxMemories }),
		set: intIn(1, 1_000_000, func(c *Config) *int { return &c.Toolbox.MaxMemories })},
	{name: "TOOLBOX_MAX_TASKS", accepts: "an integer 1-1000000", help: "tasks per mesh",
		def: showInt(func(c Config) int { return c.Toolbox.MaxTasks }),
		set: intIn(1, 1_000_000, func(c *Config) *int { return &c.Toolbox.MaxTasks })},
	{name: "TOOLBOX_MAX_SCHEDULES", accepts: "an integer 1-100000", help: "pending scheduled messages per mesh",
		def: showInt(func(c Config) int { return c.Toolbox.MaxSchedules }),
		set: intIn(1, 100_000, func(c *Config) *int { return &c.Toolbox.MaxSchedules })},
	{name: "TOOLBOX_MAX_SCHEDULES_PER_MEMBER", accepts: "an integer 1-100000", help: "pending scheduled messages per member",
		def: showInt(func(c Config) int { return c.Toolbox.MaxSchedulesPerMember }),
		set: intIn(1, 100_000, func(c *Config) *int { return &c.Toolbox.MaxSchedulesPerMember })},
	{name: "TOOLBOX_MAX_SKILLS", accepts: "an integer 1-100000", help: "skills per mesh",
		def: showInt(func(c Config) int { return c.Toolbox.MaxSkills }),
		set: intIn(1, 100_000, func(c *Config) *int { return &c.Toolbox.MaxSkills })},
	{name: "TOOLBOX_MAX_VAULT_ENTRIES", accepts: "an integer 1-100000", help: "vault entries per member",
		def: showInt(func(c Config) int { return c.Toolbox.MaxVaultEntries }),
		set: intIn(1, 100_000, func(c *Config) *int { return &c.Toolbox.MaxVaultEntries })},
	{name: "TOOLBOX_MAX_ITEM_BYTES", accepts: "an integer 256-1048576 (bytes)", help: "largest memory, task title, context summary, scheduled message, skill body or vault value",
		def: showInt(func(c Config) int { return c.Toolbox.MaxItemBytes }),
		set: intIn(256, 1<<20, func(c *Config) *int { return &c.Toolbox.MaxItemBytes })},
}

// allVars is every environment variable, the toolbox's last.
func allVars() []envVar {
	return append(append([]envVar(nil), vars...), toolboxVars...)
}
