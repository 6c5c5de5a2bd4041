package tiered

import "strconv"

// Source says which tier answered a read.
type Source uint8

const (
	SourceNone   Source = iota // no tier answered: the call failed before, or ctx ended
	SourceLocal                // L1, this process's memory
	SourceRemote               // Redis
	SourceLoader               // the loader, called by this process
)

var sourceNames = [...]string{SourceNone: "none", SourceLocal: "local", SourceRemote: "remote", SourceLoader: "loader"}

// String returns "none", "local", "remote" or "loader".
func (s Source) String() string {
	if int(s) < len(sourceNames) {
		return sourceNames[s]
	}
	return "Source(" + strconv.Itoa(int(s)) + ")"
}
