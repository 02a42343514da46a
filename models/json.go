package models

import (
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
)

// JSON is the raw text of a jsonb column (TEXT on SQLite). A nil JSON is SQL
// NULL; JSON("null") is the JSON value null. The bytes are passed through
// untouched on write; Postgres normalizes jsonb on the way back (key order,
// whitespace), so compare JSON by meaning, never byte for byte.
type JSON []byte

var (
	_ driver.Valuer    = JSON(nil)
	_ json.Marshaler   = JSON(nil)
	_ json.Unmarshaler = (*JSON)(nil)
)

// MustJSON marshals v, panicking on failure. Meant for literals and tests.
func MustJSON(v any) JSON {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("models.MustJSON: %v", err))
	}
	return JSON(b)
}

// Value writes the JSON as text. Invalid JSON is refused here so that SQLite,
// which stores any text, fails the same way Postgres would.
func (j JSON) Value() (driver.Value, error) {
	if len(j) == 0 {
		return nil, nil
	}
	if !json.Valid(j) {
		return nil, errors.New("models.JSON: value is not valid JSON")
	}
	return string(j), nil
}

// Scan reads jsonb (Postgres) or TEXT (SQLite). The bytes are copied: the
// driver may reuse its buffer after Scan returns.
func (j *JSON) Scan(src any) error {
	switch v := src.(type) {
	case nil:
		*j = nil
	case []byte:
		*j = append(JSON(nil), v...)
	case string:
		*j = JSON(v)
	default:
		return fmt.Errorf("models.JSON: cannot scan %T", src)
	}
	return nil
}

// MarshalJSON embeds the raw JSON; a nil JSON marshals as null.
func (j JSON) MarshalJSON() ([]byte, error) {
	if len(j) == 0 {
		return []byte("null"), nil
	}
	return j, nil
}

// UnmarshalJSON keeps a copy of the raw JSON.
func (j *JSON) UnmarshalJSON(b []byte) error {
	*j = append((*j)[:0], b...)
	return nil
}

// Decode unmarshals the JSON into v.
func (j JSON) Decode(v any) error {
	if len(j) == 0 {
		return errors.New("models.JSON: decode of SQL NULL")
	}
	if err := json.Unmarshal(j, v); err != nil {
		return fmt.Errorf("models.JSON: decode: %w", err)
	}
	return nil
}
