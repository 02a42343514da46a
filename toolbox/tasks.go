package toolbox

import (
	"context"
	"time"

	"github.com/claudemesh/meshbroker/models"
	"github.com/claudemesh/meshbroker/protocol"
)

// taskListLimit is the reference's: list_tasks shows the newest 100.
const taskListLimit = 100

// CreateTask adds an open task and returns its id.
func (t *Toolbox) CreateTask(ctx context.Context, c Caller, f *protocol.CreateTask) (string, error) {
	title, err := required("title", f.Title, t.limits.MaxItemBytes)
	if err != nil {
		return "", err
	}
	assignee, err := optional("assignee", f.Assignee, maxNameBytes)
	if err != nil {
		return "", err
	}
	priority, err := optional("priority", f.Priority, 32)
	if err != nil {
		return "", err
	}
	if priority == "" {
		priority = "normal"
	}
	tags, err := t.list("tags", f.Tags)
	if err != nil {
		return "", err
	}
	n, err := t.store.count(ctx, "task", "mesh_id = ?", c.MeshID)
	if err != nil {
		return "", err
	}
	if n >= int64(t.limits.MaxTasks) {
		return "", limit("this mesh holds %d tasks, the most allowed", t.limits.MaxTasks)
	}
	id := models.NewID()
	s := t.store
	if _, err := s.exec(ctx, `INSERT INTO `+s.table("task")+` (id, mesh_id, title, assignee, priority, status, tags, created_by_name, created_at)
		VALUES (?, ?, ?, ?, ?, 'open', `+s.arrayIn()+`, ?, ?)`,
		id, c.MeshID, title, strPtr(assignee), priority, arrayArg(tags), strPtr(c.DisplayName), t.now().UTC()); err != nil {
		return "", err
	}
	t.audit.Record(c.MeshID, "task_created", c.MemberID, c.DisplayName, map[string]any{"taskId": id, "titleBytes": len(title)})
	return id, nil
}

// ClaimTask claims an open task of the caller's mesh for the caller's
// presence and returns the mesh's task list. The claim is one conditional
// UPDATE: of concurrent claims exactly one changes the row; the others,
// like a claim of a task that is not open or not in this mesh, get
// task_not_claimable.
func (t *Toolbox) ClaimTask(ctx context.Context, c Caller, f *protocol.TaskRef) ([]protocol.TaskView, error) {
	id, err := required("taskId", f.TaskID, maxNameBytes)
	if err != nil {
		return nil, err
	}
	n, err := t.store.exec(ctx, `UPDATE `+t.store.table("task")+` SET status = 'claimed', claimed_by_presence = ?, claimed_by_name = ?, claimed_at = ?
		WHERE id = ? AND mesh_id = ? AND status = 'open'`,
		c.PresenceID, strPtr(c.DisplayName), t.now().UTC(), id, c.MeshID)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, &Error{Code: protocol.CodeTaskNotClaimable, Msg: "task is not open or does not exist"}
	}
	t.audit.Record(c.MeshID, "task_claimed", c.MemberID, c.DisplayName, map[string]any{"taskId": id})
	return t.ListTasks(ctx, c, &protocol.ListTasks{})
}

// CompleteTask marks a task of the caller's mesh done with its result and
// returns the mesh's task list.
func (t *Toolbox) CompleteTask(ctx context.Context, c Caller, f *protocol.TaskRef) ([]protocol.TaskView, error) {
	id, err := required("taskId", f.TaskID, maxNameBytes)
	if err != nil {
		return nil, err
	}
	result, err := optional("result", f.Result, t.limits.MaxItemBytes)
	if err != nil {
		return nil, err
	}
	n, err := t.store.exec(ctx, `UPDATE `+t.store.table("task")+` SET status = 'done', result = ?, completed_at = ? WHERE id = ? AND mesh_id = ?`,
		strPtr(result), t.now().UTC(), id, c.MeshID)
	if err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, &Error{Code: protocol.CodeTaskNotFound, Msg: "task not found in this mesh"}
	}
	t.audit.Record(c.MeshID, "task_completed", c.MemberID, c.DisplayName, map[string]any{"taskId": id, "resultBytes": len(result)})
	return t.ListTasks(ctx, c, &protocol.ListTasks{})
}

type taskRow struct {
	ID            string
	Title         string
	Assignee      *string
	ClaimedByName *string
	Status        string
	Priority      string
	CreatedByName *string
	Tags          string
	CreatedAt     time.Time
}

// ListTasks lists the mesh's newest tasks, filtered by status and assignee.
func (t *Toolbox) ListTasks(ctx context.Context, c Caller, f *protocol.ListTasks) ([]protocol.TaskView, error) {
	status, err := optional("status", f.Status, maxNameBytes)
	if err != nil {
		return nil, err
	}
	assignee, err := optional("assignee", f.Assignee, maxNameBytes)
	if err != nil {
		return nil, err
	}
	s := t.store
	q := `SELECT id, title, assignee, claimed_by_name, status, priority, created_by_name, ` + s.arrayOut("tags", "tags") + `, created_at
		FROM ` + s.table("task") + ` WHERE mesh_id = ?`
	args := []any{c.MeshID}
	if status != "" {
		q += ` AND status = ?`
		args = append(args, status)
	}
	if assignee != "" {
		q += ` AND assignee = ?`
		args = append(args, assignee)
	}
	q += ` ORDER BY created_at DESC, id DESC LIMIT ?`
	args = append(args, taskListLimit)
	var rows []taskRow
	if err := s.raw(ctx, &rows, q, args...); err != nil {
		return nil, err
	}
	out := make([]protocol.TaskView, 0, len(rows))
	for _, r := range rows {
		out = append(out, protocol.TaskView{ID: r.ID, Title: r.Title, Assignee: r.Assignee, ClaimedBy: r.ClaimedByName, Status: r.Status,
			Priority: r.Priority, CreatedBy: r.CreatedByName, Tags: decodeList(r.Tags), CreatedAt: iso(r.CreatedAt)})
	}
	return out, nil
}
