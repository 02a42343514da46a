package toolbox

import (
	"context"
	"strings"
	"time"
	"unicode"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// recallLimit is the reference's: at most 20 memories per recall.
const recallLimit = 20

// maxQueryWords bounds the terms of one recall (all are required, so a
// longer query would match nothing anyway).
const maxQueryWords = 32

// Remember stores a memory and returns its id.
func (t *Toolbox) Remember(ctx context.Context, c Caller, f *protocol.Remember) (string, error) {
	content, err := required("content", f.Content, t.limits.MaxItemBytes)
	if err != nil {
		return "", err
	}
	tags, err := t.list("tags", f.Tags)
	if err != nil {
		return "", err
	}
	n, err := t.store.count(ctx, "memory", "mesh_id = ? AND forgotten_at IS NULL", c.MeshID)
	if err != nil {
		return "", err
	}
	if n >= int64(t.limits.MaxMemories) {
		return "", limit("this mesh holds %d memories, the most allowed; forget some first", t.limits.MaxMemories)
	}
	id := models.NewID()
	s := t.store
	if _, err := s.exec(ctx, `INSERT INTO `+s.table("memory")+` (id, mesh_id, content, tags, remembered_by, remembered_by_name, remembered_at)
		VALUES (?, ?, ?, `+s.arrayIn()+`, ?, ?, ?)`,
		id, c.MeshID, content, arrayArg(tags), c.MemberID, strPtr(c.DisplayName), t.now().UTC()); err != nil {
		return "", err
	}
	t.audit.Record(c.MeshID, "memory_stored", c.MemberID, c.DisplayName, map[string]any{"memoryId": id, "bytes": len(content), "tags": len(tags)})
	return id, nil
}

type memoryRow struct {
	ID               string
	Content          string
	Tags             string
	RememberedByName *string
	RememberedAt     time.Time
}

// Recall returns the caller's mesh's memories matching query, best first.
// A query with no searchable word (empty, punctuation, only stop words)
// matches nothing.
func (t *Toolbox) Recall(ctx context.Context, c Caller, query string) ([]protocol.MemoryView, error) {
	if len(query) > t.limits.MaxItemBytes {
		return nil, limit("query is %d bytes, more than the %d allowed", len(query), t.limits.MaxItemBytes)
	}
	words := searchWords(query)
	out := []protocol.MemoryView{}
	if len(words) == 0 {
		return out, nil
	}
	if len(words) > maxQueryWords {
		return nil, limit("query has %d search words, more than the %d allowed", len(words), maxQueryWords)
	}
	s := t.store
	var rows []memoryRow
	var err error
	if s.pg() {
		// The reference's query: plainto_tsquery over the generated tsvector.
		// The words are re-joined so the tsquery sees the same terms SQLite does.
		q := strings.Join(words, " ")
		err = s.raw(ctx, &rows, `SELECT id, content, `+s.arrayOut("tags", "tags")+`, remembered_by_name, remembered_at
			FROM `+s.table("memory")+`
			WHERE mesh_id = ? AND forgotten_at IS NULL AND search_vector @@ plainto_tsquery('english', ?)
			ORDER BY ts_rank(search_vector, plainto_tsquery('english', ?)) DESC, remembered_at DESC
			LIMIT ?`, c.MeshID, q, q, recallLimit)
	} else {
		err = s.raw(ctx, &rows, `SELECT m.id, m.content, `+s.arrayOut("m.tags", "tags")+`, m.remembered_by_name, m.remembered_at
			FROM memory_fts JOIN memory m ON m.id = memory_fts.memory_id
			WHERE memory_fts MATCH ? AND m.mesh_id = ? AND m.forgotten_at IS NULL
			ORDER BY bm25(memory_fts), m.remembered_at DESC
			LIMIT ?`, ftsQuery(words), c.MeshID, recallLimit)
	}
	if err != nil {
		return nil, err
	}
	for _, r := range rows {
		out = append(out, protocol.MemoryView{ID: r.ID, Content: r.Content, Tags: decodeList(r.Tags), RememberedBy: nameOr(r.RememberedByName), RememberedAt: iso(r.RememberedAt)})
	}
	return out, nil
}

// Forget marks a memory of the caller's mesh forgotten. An unknown id, an
// already forgotten one and another mesh's are all not found.
func (t *Toolbox) Forget(ctx context.Context, c Caller, f *protocol.Forget) (string, error) {
	id, err := required("memoryId", f.MemoryID, maxNameBytes)
	if err != nil {
		return "", err
	}
	n, err := t.store.exec(ctx, `UPDATE `+t.store.table("memory")+` SET forgotten_at = ? WHERE id = ? AND mesh_id = ? AND forgotten_at IS NULL`,
		t.now().UTC(), id, c.MeshID)
	if err != nil {
		return "", err
	}
	if n == 0 {
		return "", notFound("memory")
	}
	t.audit.Record(c.MeshID, "memory_forgotten", c.MemberID, c.DisplayName, map[string]any{"memoryId": id})
	return id, nil
}

// searchWords splits a query into lower-case words of letters and digits,
// without Postgres's English stop words, so both databases search for the
// same terms and a query of stop words alone searches for nothing.
func searchWords(q string) []string {
	var out []string
	for _, w := range strings.FieldsFunc(strings.ToLower(q), func(r rune) bool { return !unicode.IsLetter(r) && !unicode.IsDigit(r) }) {
		if !stopWords[w] {
			out = append(out, w)
		}
	}
	return out
}

// ftsQuery ANDs the words as FTS5 strings (plainto_tsquery ANDs its terms).
// A word has only letters and digits, so quoting cannot be escaped.
func ftsQuery(words []string) string {
	quoted := make([]string, len(words))
	for i, w := range words {
		quoted[i] = `"` + w + `"`
	}
	return strings.Join(quoted, " AND ")
}

// stopWords is the English stop-word list of Postgres's 'english' text
// search configuration (snowball), which to_tsvector and plainto_tsquery drop.
var stopWords = func() map[string]bool {
	m := map[string]bool{}
	for _, w := range strings.Fields(`i me my myself we our ours ourselves you your yours yourself yourselves he him his himself
		she her hers herself it its itself they them their theirs themselves what which who whom this that these those
		am is are was were be been being have has had having do does did doing a an the and but if or because as until
		while of at by for with about against between into through during before after above below to from up down in
		out on off over under again further then once here there when where why how all any both each few more most
		other some such no nor not only own same so than too very s t can will just don should now`) {
		m[w] = true
	}
	return m
}()
