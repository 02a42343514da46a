package toolbox

import (
	"context"
	"encoding/json"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// ShareSkill publishes a skill under its name, replacing one of that name.
func (t *Toolbox) ShareSkill(ctx context.Context, c Caller, f *protocol.ShareSkill) (string, error) {
	name, err := required("name", f.Name, maxNameBytes)
	if err != nil {
		return "", err
	}
	desc, err := optional("description", f.Description, t.limits.MaxItemBytes)
	if err != nil {
		return "", err
	}
	instructions, err := required("instructions", f.Instructions, t.limits.MaxItemBytes)
	if err != nil {
		return "", err
	}
	tags, err := t.list("tags", f.Tags)
	if err != nil {
		return "", err
	}
	var manifest *string
	if len(f.Manifest) > 0 && string(f.Manifest) != "null" {
		if len(f.Manifest) > t.limits.MaxItemBytes {
			return "", limit("manifest is %d bytes, more than the %d allowed", len(f.Manifest), t.limits.MaxItemBytes)
		}
		if !json.Valid(f.Manifest) {
			return "", invalid("manifest must be JSON")
		}
		m := string(f.Manifest)
		manifest = &m
	}
	s := t.store
	exists, err := s.count(ctx, "skill", "mesh_id = ? AND name = ?", c.MeshID, name)
	if err != nil {
		return "", err
	}
	if exists == 0 {
		n, err := s.count(ctx, "skill", "mesh_id = ?", c.MeshID)
		if err != nil {
			return "", err
		}
		if n >= int64(t.limits.MaxSkills) {
			return "", limit("this mesh holds %d skills, the most allowed", t.limits.MaxSkills)
		}
	}
	now := t.now().UTC()
	q := `INSERT INTO ` + s.table("skill") + ` (id, mesh_id, name, description, instructions, tags, manifest, author_member_id, author_name, created_at, updated_at)
		VALUES (?, ?, ?, ?, ?, ` + s.arrayIn() + `, ` + s.jsonIn() + `, ?, ?, ?, ?)
		ON CONFLICT (mesh_id, name) DO UPDATE SET description = excluded.description, instructions = excluded.instructions,
			tags = excluded.tags, manifest = excluded.manifest, author_member_id = excluded.author_member_id,
			author_name = excluded.author_name, updated_at = excluded.updated_at
		RETURNING id`
	var got []struct{ ID string }
	if err := s.raw(ctx, &got, q, models.NewID(), c.MeshID, name, desc, instructions, arrayArg(tags), manifest, c.MemberID, strPtr(c.DisplayName), now, now); err != nil {
		return "", err
	}
	t.audit.Record(c.MeshID, "skill_shared", c.MemberID, c.DisplayName, map[string]any{"name": name, "instructionsBytes": len(instructions)})
	return name, nil
}

type skillRow struct {
	Name         string
	Description  string
	Instructions string
	Tags         string
	AuthorName   *string
	Manifest     *string
	CreatedAt    time.Time
}

// GetSkill returns a skill of the caller's mesh by name, or nil.
func (t *Toolbox) GetSkill(ctx context.Context, c Caller, f *protocol.SkillRef) (*protocol.SkillView, error) {
	name, err := required("name", f.Name, maxNameBytes)
	if err != nil {
		return nil, err
	}
	s := t.store
	var rows []skillRow
	if err := s.raw(ctx, &rows, `SELECT name, description, instructions, `+s.arrayOut("tags", "tags")+`, author_name, `+s.jsonOut("manifest", "manifest")+`, created_at
		FROM `+s.table("skill")+` WHERE mesh_id = ? AND name = ? LIMIT 1`, c.MeshID, name); err != nil {
		return nil, err
	}
	if len(rows) == 0 {
		return nil, nil
	}
	r := rows[0]
	v := &protocol.SkillView{Name: r.Name, Description: r.Description, Instructions: &r.Instructions, Tags: decodeList(r.Tags),
		Author: nameOr(r.AuthorName), CreatedAt: iso(r.CreatedAt), Manifest: json.RawMessage("null")}
	if r.Manifest != nil {
		v.Manifest = json.RawMessage(*r.Manifest)
	}
	return v, nil
}

// ListSkills lists the mesh's skills by name, those whose name, description
// or a tag contains query (case-insensitively) when it is not empty.
func (t *Toolbox) ListSkills(ctx context.Context, c Caller, query string) ([]protocol.SkillView, error) {
	if len(query) > maxNameBytes {
		return nil, limit("query is %d bytes, more than the %d allowed", len(query), maxNameBytes)
	}
	s := t.store
	q := `SELECT name, description, ` + s.arrayOut("tags", "tags") + `, author_name, created_at FROM ` + s.table("skill") + ` WHERE mesh_id = ?`
	args := []any{c.MeshID}
	if query != "" {
		p := containsPattern(query)
		q += ` AND (` + s.ilike("name") + ` OR ` + s.ilike("description") + ` OR ` + s.arrayLike("skill", "tags") + `)`
		args = append(args, p, p, p)
	}
	q += ` ORDER BY name`
	var rows []skillRow
	if err := s.raw(ctx, &rows, q, args...); err != nil {
		return nil, err
	}
	out := make([]protocol.SkillView, 0, len(rows))
	for _, r := range rows {
		out = append(out, protocol.SkillView{Name: r.Name, Description: r.Description, Tags: decodeList(r.Tags), Author: nameOr(r.AuthorName), CreatedAt: iso(r.CreatedAt)})
	}
	return out, nil
}

// RemoveSkill deletes a skill; only its author or a mesh admin may. It
// reports false for a name the mesh has no skill of.
func (t *Toolbox) RemoveSkill(ctx context.Context, c Caller, f *protocol.SkillRef) (bool, error) {
	name, err := required("name", f.Name, maxNameBytes)
	if err != nil {
		return false, err
	}
	s := t.store
	var rows []struct{ AuthorMemberID *string }
	if err := s.raw(ctx, &rows, `SELECT author_member_id FROM `+s.table("skill")+` WHERE mesh_id = ? AND name = ?`, c.MeshID, name); err != nil {
		return false, err
	}
	if len(rows) == 0 {
		return false, nil
	}
	if a := rows[0].AuthorMemberID; a == nil || *a != c.MemberID {
		ok, err := t.mods.IsModerator(ctx, c.MeshID, c.MemberID)
		if err != nil {
			return false, err
		}
		if !ok {
			return false, &Error{Code: protocol.CodeForbidden, Msg: "only the skill's author or a mesh admin may remove it"}
		}
	}
	n, err := s.exec(ctx, `DELETE FROM `+s.table("skill")+` WHERE mesh_id = ? AND name = ?`, c.MeshID, name)
	if err != nil {
		return false, err
	}
	if n > 0 {
		t.audit.Record(c.MeshID, "skill_removed", c.MemberID, c.DisplayName, map[string]any{"name": name})
	}
	return n > 0, nil
}
