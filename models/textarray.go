package models

import (
	"database/sql/driver"
	"strings"
	"time"
)

// TextArray is one Postgres text[] bind parameter. A batch insert written as
// INSERT … SELECT … FROM unnest($1::text[], $2::text[], …) sends one array
// per column, a fixed handful of parameters however many rows it carries,
// where a VALUES list needs a placeholder per column and row and costs the
// driver and the server a parse and bind of each. A nil element is SQL NULL.
//
// It is sent as an array literal, so the statement must cast it (::text[]),
// and it is for Postgres only: SQLite has no arrays.
type TextArray []*string

var _ driver.Valuer = TextArray(nil)

// Value renders the array literal: every element double-quoted, with
// backslash and double quote escaped, which is all a quoted element needs.
func (a TextArray) Value() (driver.Value, error) {
	n := 2
	for _, s := range a {
		n += 3
		if s != nil {
			n += len(*s)
		}
	}
	var b strings.Builder
	b.Grow(n)
	b.WriteByte('{')
	for i, s := range a {
		if i > 0 {
			b.WriteByte(',')
		}
		if s == nil {
			b.WriteString("NULL")
			continue
		}
		b.WriteByte('"')
		for j := 0; j < len(*s); j++ {
			if c := (*s)[j]; c == '"' || c == '\\' {
				b.WriteByte('\\')
			}
			b.WriteByte((*s)[j])
		}
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String(), nil
}

// TextColumns collects a batch of rows column by column, one TextArray per
// column, for an INSERT … SELECT FROM unnest(…).
type TextColumns []TextArray

// NewTextColumns makes cols empty columns with room for rows rows.
func NewTextColumns(cols, rows int) TextColumns {
	c := make(TextColumns, cols)
	for i := range c {
		c[i] = make(TextArray, 0, rows)
	}
	return c
}

// Add appends one row; it must have one value per column.
func (c TextColumns) Add(row ...*string) {
	for i, v := range row {
		c[i] = append(c[i], v)
	}
}

// Args returns the columns as bind arguments, in order.
func (c TextColumns) Args() []any {
	args := make([]any, len(c))
	for i, col := range c {
		args[i] = col
	}
	return args
}

// Text returns a pointer to s, for a non-NULL element.
func Text(s string) *string { return &s }

// TimestampText renders t for a `timestamp` column, UTC with microseconds
// (the column's precision), to be cast with ::timestamp.
func TimestampText(t time.Time) *string {
	s := t.UTC().Format(SQLiteTimeLayout)
	return &s
}
