// Package models owns meshbroker's storage: the gorm structs for the tables of
// the reference claudemesh `mesh` schema, opening the database (Postgres or an
// embedded SQLite file), creating what is missing at start, and checking that
// an existing schema has every column meshbroker reads or writes.
//
// # One schema, two dialects
//
// On Postgres the tables live in the `mesh` schema with the names, column
// types, defaults, enums, keys and indexes of the reference's SQL migrations
// (packages/db/migrations at 9d1b4f3), so meshbroker and the web app can share
// a database. Where mesh.ts and the migrations disagree, the migrations win:
// they are what a migrated database really has. On SQLite the same tables exist
// without a schema prefix; enums are TEXT with CHECK constraints and jsonb is
// TEXT checked with json_valid. Services that write raw SQL get the qualified
// name from [DB.Table] and branch on [DB.IsPostgres] where the dialects differ;
// gorm's `?` placeholders work on both.
//
// # Conventions every caller relies on
//
//   - Times are UTC. Timestamp columns are `timestamp without time zone` holding
//     UTC wall-clock time, as in the reference. Pass UTC times; the drivers
//     convert any other location to UTC on the way in (Postgres via a pgx
//     codec, SQLite via the connection wrapper), and scanning always yields
//     times in time.UTC. Precision is one microsecond on both dialects (Go's
//     nanoseconds are truncated), so compare stored times at µs precision.
//   - On SQLite a time is stored as fixed-width text "2006-01-02 15:04:05.000000"
//     so that ORDER BY and <, > on timestamp columns are chronological; the
//     columns are declared DATETIME so the driver parses them back. A computed
//     expression (max(created_at), say) has no declared type and scans as a
//     string: use [ParseSQLiteTime] on it, or select the column itself.
//   - Nullable columns are pointer fields; jsonb columns are [JSON] (nil is SQL
//     NULL, JSON("null") is a JSON null).
//   - A field tagged `default:` is left out of an INSERT when it holds its zero
//     value, so the database default applies and gorm reads it back. Booleans
//     with a `true` default (peer_state.visible) carry no such tag, because
//     gorm could not tell false from unset: set them explicitly.
//   - Row ids are set by the caller with [NewID]; nothing generates them.
//   - gorm errors are translated: a unique violation is gorm.ErrDuplicatedKey
//     and a foreign-key violation gorm.ErrForeignKeyViolated on both dialects.
//
// # Concurrency
//
// A [DB] is safe for concurrent use. On SQLite it holds exactly one connection,
// so writers queue in Go instead of failing with SQLITE_BUSY; the consequence is
// that code inside a transaction must use only the transaction handle, since a
// second statement on the DB would wait for the connection the transaction holds.
package models
