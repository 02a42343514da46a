// Package protocol is the claudemesh wire contract: frame types, the
// canonical signing strings, error and close codes, and the small value
// formats (ISO times, JavaScript numbers, ids) that clients compare byte for
// byte. Handlers, services, the Go client and the tests all share it, so a
// field name is spelled in exactly one place.
//
// Outbound structs list their fields in the reference broker's emission
// order; clients key off names, but keeping the order makes captures diffable.
package protocol
