package models

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	_ "modernc.org/sqlite" // registers the "sqlite" driver wrapped below
)

// SQLiteTimeLayout is how a time is stored on SQLite: UTC, microseconds,
// fixed width, so text order is chronological order.
const SQLiteTimeLayout = "2006-01-02 15:04:05.000000"

// FormatSQLiteTime renders t the way SQLite columns store it. The connection
// does this for every time.Time argument; services need it only to build a
// literal by hand.
func FormatSQLiteTime(t time.Time) string {
	return t.UTC().Format(SQLiteTimeLayout)
}

// ParseSQLiteTime parses a stored SQLite time (also the millisecond form the
// column defaults write) as UTC.
func ParseSQLiteTime(s string) (time.Time, error) {
	// Parsing with ".999999999" accepts any number of fraction digits.
	t, err := time.ParseInLocation("2006-01-02 15:04:05.999999999", s, time.UTC)
	if err != nil {
		return time.Time{}, fmt.Errorf("parse sqlite time %q: %w", s, err)
	}
	return t, nil
}

// sqliteConnector hands out modernc.org/sqlite connections wrapped by
// sqliteConn. The driver would otherwise write times in a variable-width,
// zone-dependent format, which sorts wrongly as soon as one writer is not UTC.
type sqliteConnector struct {
	dsn string
	drv driver.Driver
}

func newSQLiteConnector(dsn string) (*sqliteConnector, error) {
	// sql.Open does not connect; it only looks the registered driver up.
	probe, err := sql.Open("sqlite", "")
	if err != nil {
		return nil, fmt.Errorf("sqlite driver: %w", err)
	}
	drv := probe.Driver()
	if err := probe.Close(); err != nil {
		return nil, fmt.Errorf("sqlite driver: %w", err)
	}
	return &sqliteConnector{dsn: dsn, drv: drv}, nil
}

func (c *sqliteConnector) Connect(context.Context) (driver.Conn, error) {
	conn, err := c.drv.Open(c.dsn)
	if err != nil {
		return nil, err
	}
	return &sqliteConn{inner: conn}, nil
}

func (c *sqliteConnector) Driver() driver.Driver { return c.drv }

// sqliteConn forwards to the driver's connection and converts arguments in
// CheckNamedValue. database/sql consults the connection's checker because the
// driver's statements implement none of their own.
type sqliteConn struct {
	inner driver.Conn
}

var (
	_ driver.ConnBeginTx        = (*sqliteConn)(nil)
	_ driver.ConnPrepareContext = (*sqliteConn)(nil)
	_ driver.ExecerContext      = (*sqliteConn)(nil)
	_ driver.QueryerContext     = (*sqliteConn)(nil)
	_ driver.Pinger             = (*sqliteConn)(nil)
	_ driver.NamedValueChecker  = (*sqliteConn)(nil)
)

// CheckNamedValue applies database/sql's default conversion (Valuer, pointer
// dereference, integer widening) and then writes any time.Time as fixed-width
// UTC text.
func (c *sqliteConn) CheckNamedValue(nv *driver.NamedValue) error {
	v, err := driver.DefaultParameterConverter.ConvertValue(nv.Value)
	if err != nil {
		return err
	}
	if t, ok := v.(time.Time); ok {
		v = FormatSQLiteTime(t)
	}
	nv.Value = v
	return nil
}

func (c *sqliteConn) Prepare(query string) (driver.Stmt, error) { return c.inner.Prepare(query) }

func (c *sqliteConn) Close() error { return c.inner.Close() }

// Begin exists because driver.Conn requires it; database/sql calls BeginTx.
func (c *sqliteConn) Begin() (driver.Tx, error) {
	return c.BeginTx(context.Background(), driver.TxOptions{})
}

func (c *sqliteConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	if b, ok := c.inner.(driver.ConnBeginTx); ok {
		return b.BeginTx(ctx, opts)
	}
	return nil, errors.New("sqlite driver lacks BeginTx")
}

func (c *sqliteConn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	if p, ok := c.inner.(driver.ConnPrepareContext); ok {
		return p.PrepareContext(ctx, query)
	}
	return c.inner.Prepare(query)
}

func (c *sqliteConn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	if e, ok := c.inner.(driver.ExecerContext); ok {
		return e.ExecContext(ctx, query, args)
	}
	return nil, driver.ErrSkip
}

func (c *sqliteConn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	if q, ok := c.inner.(driver.QueryerContext); ok {
		return q.QueryContext(ctx, query, args)
	}
	return nil, driver.ErrSkip
}

func (c *sqliteConn) Ping(ctx context.Context) error {
	if p, ok := c.inner.(driver.Pinger); ok {
		return p.Ping(ctx)
	}
	return nil
}

// registerUTCTimestamp replaces pgx's codec for `timestamp` on a new
// connection. pgx writes a time.Time's wall clock in its own location and
// drops the zone, so a time.Local value would be stored hours off; this codec
// converts to UTC first. Scanning is unchanged: pgx already returns UTC.
func registerUTCTimestamp(_ context.Context, conn *pgx.Conn) error {
	conn.TypeMap().RegisterType(&pgtype.Type{
		Name:  "timestamp",
		OID:   pgtype.TimestampOID,
		Codec: &utcTimestampCodec{},
	})
	return nil
}

type utcTimestampCodec struct {
	pgtype.TimestampCodec
}

func (c *utcTimestampCodec) PlanEncode(m *pgtype.Map, oid uint32, format int16, value any) pgtype.EncodePlan {
	next := c.TimestampCodec.PlanEncode(m, oid, format, value)
	if next == nil {
		return nil
	}
	return utcEncodePlan{next: next}
}

type utcEncodePlan struct {
	next pgtype.EncodePlan
}

func (p utcEncodePlan) Encode(value any, buf []byte) ([]byte, error) {
	// TimestampCodec plans only for TimestampValuer; pgx wraps time.Time in one.
	tv, ok := value.(pgtype.TimestampValuer)
	if !ok {
		return p.next.Encode(value, buf)
	}
	ts, err := tv.TimestampValue()
	if err != nil {
		return nil, err
	}
	if ts.Valid && ts.InfinityModifier == pgtype.Finite {
		ts.Time = ts.Time.UTC()
	}
	return p.next.Encode(ts, buf)
}
