package models

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"gorm.io/gorm"
	gormlogger "gorm.io/gorm/logger"
)

// gormLogger sends gorm's failures to slog at debug level and drops the rest.
// Failed statements come back to the caller as errors, which the caller wraps
// and returns; the debug line only adds the SQL for whoever is tracing. The
// SQL is logged without its arguments, since those can be ciphertext.
type gormLogger struct {
	log *slog.Logger
}

var (
	_ gormlogger.Interface = gormLogger{}
	_ gorm.ParamsFilter    = gormLogger{}
)

func newGormLogger(l *slog.Logger) gormLogger {
	return gormLogger{log: l.With("svc", "db")}
}

func (l gormLogger) LogMode(gormlogger.LogLevel) gormlogger.Interface { return l }

func (l gormLogger) Info(context.Context, string, ...any) {}

func (l gormLogger) Warn(ctx context.Context, msg string, args ...any) {
	l.log.DebugContext(ctx, "gorm warning", "msg", fmt.Sprintf(msg, args...))
}

func (l gormLogger) Error(ctx context.Context, msg string, args ...any) {
	l.log.DebugContext(ctx, "gorm error", "msg", fmt.Sprintf(msg, args...))
}

func (l gormLogger) Trace(ctx context.Context, begin time.Time, fc func() (string, int64), err error) {
	if err == nil || errors.Is(err, gorm.ErrRecordNotFound) || !l.log.Enabled(ctx, slog.LevelDebug) {
		return
	}
	sql, rows := fc()
	l.log.DebugContext(ctx, "query failed", "sql", sql, "rows", rows, "elapsed", time.Since(begin), "err", err)
}

// ParamsFilter keeps statement arguments out of the SQL text gorm builds for
// Trace.
func (l gormLogger) ParamsFilter(_ context.Context, sql string, _ ...any) (string, []any) {
	return sql, nil
}
