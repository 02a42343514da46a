package toolbox

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"gorm.io/gorm"

	"github.com/claudemesh/meshbroker/models"
)

// store is the toolbox's access to its tables: raw SQL through gorm, with
// the few expressions that differ between Postgres and SQLite (text arrays,
// jsonb, case-insensitive LIKE) behind helpers.
type store struct {
	db *models.DB
}

func (s *store) pg() bool { return s.db.IsPostgres() }

func (s *store) table(name string) string { return s.db.Table(name) }

func (s *store) conn(ctx context.Context) *gorm.DB { return s.db.WithContext(ctx) }

func (s *store) raw(ctx context.Context, dst any, q string, args ...any) error {
	if err := s.conn(ctx).Raw(q, args...).Scan(dst).Error; err != nil {
		return fmt.Errorf("toolbox query: %w", err)
	}
	return nil
}

func (s *store) exec(ctx context.Context, q string, args ...any) (int64, error) {
	res := s.conn(ctx).Exec(q, args...)
	if res.Error != nil {
		return 0, fmt.Errorf("toolbox write: %w", res.Error)
	}
	return res.RowsAffected, nil
}

func (s *store) count(ctx context.Context, table, where string, args ...any) (int64, error) {
	var n int64
	if err := s.conn(ctx).Raw(`SELECT count(*) FROM `+s.table(table)+` WHERE `+where, args...).Scan(&n).Error; err != nil {
		return 0, fmt.Errorf("toolbox count %s: %w", table, err)
	}
	return n, nil
}

// arrayIn is the bind expression for a text-array column; bind arrayArg.
func (s *store) arrayIn() string {
	if s.pg() {
		return `ARRAY(SELECT json_array_elements_text(CAST(? AS json)))`
	}
	return `?`
}

// arrayArg encodes a list for arrayIn: a JSON array either way.
func arrayArg(list []string) string {
	if list == nil {
		list = []string{}
	}
	b, _ := json.Marshal(list)
	return string(b)
}

// arrayOut selects a text-array column as a JSON array text, aliased.
func (s *store) arrayOut(col, alias string) string {
	if s.pg() {
		return `COALESCE(array_to_json(` + col + `)::text, '[]') AS ` + alias
	}
	return `COALESCE(` + col + `, '[]') AS ` + alias
}

// decodeList reads what arrayOut selected.
func decodeList(raw string) []string {
	out := []string{}
	if raw != "" {
		_ = json.Unmarshal([]byte(raw), &out)
	}
	if out == nil {
		out = []string{}
	}
	return out
}

// arrayHas is a condition: the array column holds exactly the bound value.
func (s *store) arrayHas(table, col string) string {
	if s.pg() {
		return `? = ANY(` + col + `)`
	}
	return `EXISTS (SELECT 1 FROM json_each(` + table + `.` + col + `) WHERE value = ?)`
}

// arrayLike is a condition: some element matches the bound LIKE pattern,
// case-insensitively.
func (s *store) arrayLike(table, col string) string {
	if s.pg() {
		return `EXISTS (SELECT 1 FROM unnest(` + col + `) AS t WHERE t ILIKE ? ESCAPE '\')`
	}
	return `EXISTS (SELECT 1 FROM json_each(` + table + `.` + col + `) WHERE value LIKE ? ESCAPE '\')`
}

// ilike is a case-insensitive LIKE of the bound pattern (SQLite's LIKE is
// case-insensitive for ASCII, as ILIKE is for everything).
func (s *store) ilike(col string) string {
	if s.pg() {
		return col + ` ILIKE ? ESCAPE '\'`
	}
	return col + ` LIKE ? ESCAPE '\'`
}

// containsPattern is a LIKE pattern matching text that contains q literally.
func containsPattern(q string) string {
	r := strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`)
	return "%" + r.Replace(q) + "%"
}

// jsonIn is the bind expression for a jsonb column.
func (s *store) jsonIn() string {
	if s.pg() {
		return `CAST(? AS jsonb)`
	}
	return `?`
}

// jsonOut selects a jsonb column as text, aliased.
func (s *store) jsonOut(col, alias string) string {
	if s.pg() {
		return col + `::text AS ` + alias
	}
	return col + ` AS ` + alias
}
