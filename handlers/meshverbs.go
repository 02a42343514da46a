package handlers

import (
	"context"

	"github.com/claudemesh/meshbroker/protocol"
)

// Frames of the mesh verbs (services.MeshVerbs): mesh_info, list_bans,
// topic_members, topic_history, topic_mark_read. Each echoes _reqId.

func handleMeshInfo(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	res, err := w.srv.svc.MeshVerbs.MeshInfo(ctx, w.presence)
	if err != nil {
		return nil, err
	}
	res.ReqID = h.ReqID
	return res, nil
}

func handleListBans(ctx context.Context, w *wsConn, h protocol.Head, _ []byte) (any, error) {
	bans, err := w.srv.svc.MeshVerbs.ListBans(ctx, w.presence)
	if err != nil {
		return nil, err
	}
	return protocol.ListBansResult{Type: "list_bans_result", Bans: bans, ReqID: h.ReqID}, nil
}

func topicArg(raw []byte) (string, error) {
	s, ok := protocol.RawString(raw)
	if !ok || s == "" {
		return "", badArg("topic must be a non-empty string")
	}
	return s, nil
}

func handleTopicMembers(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.TopicRef](data)
	if err != nil {
		return nil, err
	}
	topic, err := topicArg(f.Topic)
	if err != nil {
		return nil, err
	}
	members, err := w.srv.svc.MeshVerbs.TopicMembers(ctx, w.presence, topic)
	if err != nil {
		return topicError(h, err)
	}
	return protocol.TopicMembersResponse{Type: "topic_members_response", Topic: topic, Members: members, ReqID: h.ReqID}, nil
}

func handleTopicHistory(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.TopicHistory](data)
	if err != nil {
		return nil, err
	}
	topic, err := topicArg(f.Topic)
	if err != nil {
		return nil, err
	}
	limit := 0
	if !absent(f.Limit) {
		v, ok := protocol.RawNumber(f.Limit)
		if !ok || v != float64(int(v)) || v < 1 {
			return nil, badArg("limit must be a positive integer")
		}
		limit = int(min(v, 1e6))
	}
	before := ""
	if !absent(f.BeforeID) {
		if before, err = needString(f.BeforeID, "beforeId", false); err != nil {
			return nil, err
		}
	}
	msgs, err := w.srv.svc.MeshVerbs.TopicHistory(ctx, w.presence, topic, limit, before)
	if err != nil {
		return topicError(h, err)
	}
	return protocol.TopicHistoryResponse{Type: "topic_history_response", Topic: topic, Messages: msgs, ReqID: h.ReqID}, nil
}

// handleTopicMarkRead has no reply on success, as in the reference.
func handleTopicMarkRead(ctx context.Context, w *wsConn, h protocol.Head, data []byte) (any, error) {
	f, err := decodeInto[protocol.TopicRef](data)
	if err != nil {
		return nil, err
	}
	topic, err := topicArg(f.Topic)
	if err != nil {
		return nil, err
	}
	if err := w.srv.svc.MeshVerbs.TopicMarkRead(ctx, w.presence, topic); err != nil {
		return topicError(h, err)
	}
	return nil, nil
}
