package tiered

import "errors"

// Sentinel errors. Every error a Cache returns either is one of these (test
// with errors.Is), wraps one of them, or is the caller's context error or the
// loader's own error.
var (
	// ErrNotFound means neither tier holds the key (Get), or the loader said
	// the key does not exist (GetOrLoad). A loader reports "not found" by
	// returning an error for which errors.Is(err, ErrNotFound) is true; with
	// Options.NegativeTTL set, that answer is remembered in both tiers.
	ErrNotFound = errors.New("tiered: not found")

	// ErrClosed is returned by every method called after Close.
	ErrClosed = errors.New("tiered: cache closed")

	// ErrInvalidKey is returned for an empty key.
	ErrInvalidKey = errors.New("tiered: invalid key")

	// ErrInvalidOption is returned by New for unusable Options and by calls
	// given a negative TTL.
	ErrInvalidOption = errors.New("tiered: invalid option")

	// ErrEncode wraps the codec's error when a value cannot be encoded. Set
	// stores nothing in either tier; GetOrLoad returns the loaded value with
	// a nil error but does not cache it.
	ErrEncode = errors.New("tiered: cannot encode value")

	// ErrRemoteUnavailable wraps the Redis error when Redis could not answer
	// (connection refused, timeout, cluster down, ...). Reads by GetOrLoad
	// never return it: they fall back to the loader. Get, Set and Delete do.
	ErrRemoteUnavailable = errors.New("tiered: redis unavailable")

	// ErrLoaderPanic is returned to every caller waiting on a load whose
	// loader panicked. The message carries the panic value and stack.
	ErrLoaderPanic = errors.New("tiered: loader panicked")
)
