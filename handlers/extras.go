package handlers

// extraHandlers are the frames of the real-time extras (04 §2-§9).
var extraHandlers = map[string]frameHandler{}
