package services

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
)

// Database metrics: every statement the services send goes through gorm,
// so gorm callbacks around each operation time it and count its failures.
//
// Concurrency: the callbacks run on the goroutine of the statement; the
// start time travels in the statement's own settings, and the collectors
// are safe for concurrent use.

// dbOps are gorm's callback chains, which are also the op label values.
var dbOps = []string{"create", "query", "update", "delete", "row", "raw"}

const dbStartKey = "meshbroker:start"

// InstrumentDB registers the metric callbacks on db once per broker.
// Statements run outside gorm (bootstrap's DDL on the raw connection) are
// not counted.
func InstrumentDB(db *models.DB, m *Metrics) error {
	// The statement's own settings map, with a constant key: gorm's
	// InstanceSet would format the statement's address into the key on
	// every statement.
	before := func(tx *gorm.DB) { tx.Statement.Settings.Store(dbStartKey, time.Now()) }
	after := func(op string) func(*gorm.DB) {
		hist := m.DBQuery.WithLabelValues(op)
		errs := m.DBErrors.WithLabelValues(op)
		return func(tx *gorm.DB) {
			if v, ok := tx.Statement.Settings.LoadAndDelete(dbStartKey); ok {
				if start, ok := v.(time.Time); ok {
					hist.Observe(time.Since(start).Seconds())
				}
			}
			if tx.Error != nil && !errors.Is(tx.Error, gorm.ErrRecordNotFound) {
				errs.Inc()
			}
		}
	}
	cb := db.Callback()
	register := []struct {
		op  string
		pre func(string, func(*gorm.DB)) error
		suf func(string, func(*gorm.DB)) error
	}{
		{"create", func(n string, f func(*gorm.DB)) error { return cb.Create().Before("gorm:create").Register(n, f) },
			func(n string, f func(*gorm.DB)) error { return cb.Create().After("gorm:create").Register(n, f) }},
		{"query", func(n string, f func(*gorm.DB)) error { return cb.Query().Before("gorm:query").Register(n, f) },
			func(n string, f func(*gorm.DB)) error { return cb.Query().After("gorm:query").Register(n, f) }},
		{"update", func(n string, f func(*gorm.DB)) error { return cb.Update().Before("gorm:update").Register(n, f) },
			func(n string, f func(*gorm.DB)) error { return cb.Update().After("gorm:update").Register(n, f) }},
		{"delete", func(n string, f func(*gorm.DB)) error { return cb.Delete().Before("gorm:delete").Register(n, f) },
			func(n string, f func(*gorm.DB)) error { return cb.Delete().After("gorm:delete").Register(n, f) }},
		{"row", func(n string, f func(*gorm.DB)) error { return cb.Row().Before("gorm:row").Register(n, f) },
			func(n string, f func(*gorm.DB)) error { return cb.Row().After("gorm:row").Register(n, f) }},
		{"raw", func(n string, f func(*gorm.DB)) error { return cb.Raw().Before("gorm:raw").Register(n, f) },
			func(n string, f func(*gorm.DB)) error { return cb.Raw().After("gorm:raw").Register(n, f) }},
	}
	for _, r := range register {
		if err := r.pre("meshbroker:metrics_before_"+r.op, before); err != nil {
			return fmt.Errorf("register %s metrics callback: %w", r.op, err)
		}
		if err := r.suf("meshbroker:metrics_after_"+r.op, after(r.op)); err != nil {
			return fmt.Errorf("register %s metrics callback: %w", r.op, err)
		}
	}
	return nil
}

// SetBuildInfo sets meshbroker_build_info for this process.
func (m *Metrics) SetBuildInfo(version, revision string) {
	m.BuildInfo.WithLabelValues(version, revision, runtime.Version()).Set(1)
}
