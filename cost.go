package tiered

import (
	"reflect"
	"sync"
	"unsafe"
)

// L1's budget (Options.LocalMaxBytes) is in bytes of memory, so an entry is
// charged what its decoded value holds in memory, not its encoding: a
// []int of 1,000 small numbers is ~4 KB of JSON but 8 KB of Go, a short
// string in a struct is a 16-byte header plus its bytes. The estimate is
// made once per fill, Set or message carrying a value (never on a hit),
// by walking the value with reflection:
//
//   - every allocation is rounded up to the size class Go would give it;
//   - what a pointer, interface, slice, string or map refers to is counted
//     once per value (shared pointers are visited once; strings and slices
//     that share a backing array are not detected and counted each time);
//   - a slice or map of more than costSample elements that hold pointers
//     is charged the mean of its first costSample elements times its
//     length, and the walk follows at most costPointers pointers and maps,
//     so that the estimate is cheap and bounded whatever the value's graph
//     (a linked list longer than that is undercharged: set Options.Cost).
const (
	costSample   = 64
	costPointers = 4096
)

// entryOverhead is what an L1 entry costs beyond its value's out-of-line
// memory and the entry itself (which holds V, see entryCost): ristretto's
// item in its store shard map and its cost in its policy's map (144
// bytes), and the eviction policy's share (104: a slot in its queue, and a
// hash in the ghost, each with their slack, and 8 to 16 counters of its
// frequency sketch). Measured with TestLocalMaxBytesBoundsTheLiveHeap.
const entryOverhead = 144 + 104

// entryCost returns what the entry of v costs in L1: the estimate of v's
// memory (or Options.Cost's), plus the entry itself and ristretto's share.
// If cost panics, the estimate is used, and the panic is returned.
func entryCost[V any](v V, cost func(any) int64) (n int64, panicked any) {
	size := int64(allocSize(unsafe.Sizeof(entry[V]{}))) + entryOverhead
	if cost != nil {
		n, panicked = callCost(cost, v)
		if panicked == nil {
			return size + max(n, 0), nil
		}
	}
	return size + int64(referencedSize(valueOf(v))), panicked
}

// valueOf returns v as a reflect.Value of type V. For a V that is not an
// interface type, v is boxed, which does not allocate for a pointer;
// reflect.ValueOf(&v) would make v escape (an allocation per fill). An
// interface is taken by its address (in a function of its own, or v would
// escape in either case), so that the walk sees the interface, not what it
// holds.
func valueOf[V any](v V) reflect.Value {
	if reflect.TypeFor[V]().Kind() == reflect.Interface {
		return interfaceValue(v)
	}
	return reflect.ValueOf(v)
}

func interfaceValue[V any](v V) reflect.Value { return reflect.ValueOf(&v).Elem() }

func callCost(cost func(any) int64, v any) (n int64, panicked any) {
	defer func() { panicked = recover() }()
	return cost(v), nil
}

// referencedSize returns the bytes of memory v refers to, beyond its own
// inline size.
func referencedSize(v reflect.Value) uintptr {
	if !typeHasPointers(v.Type()) {
		return 0
	}
	w := costWalk{}
	return w.refs(v)
}

// costWalk is one walk. A value's graph usually has a handful of pointers
// and maps: they are remembered in few, without an allocation, and only
// the rest in seen.
type costWalk struct {
	few  [8]uintptr
	nfew int
	seen map[uintptr]struct{} // pointers and maps already counted, beyond few
}

// refs returns the out-of-line memory v refers to.
func (w *costWalk) refs(v reflect.Value) uintptr {
	switch v.Kind() {
	case reflect.String:
		if v.Len() == 0 {
			return 0
		}
		return allocSize(uintptr(v.Len()))
	case reflect.Slice:
		if v.IsNil() {
			return 0
		}
		elem := v.Type().Elem()
		n := allocSize(uintptr(v.Cap()) * elem.Size())
		if typeHasPointers(elem) {
			n += w.elems(v.Len(), func(i int) uintptr { return w.refs(v.Index(i)) })
		}
		return n
	case reflect.Array:
		if !typeHasPointers(v.Type().Elem()) {
			return 0
		}
		return w.elems(v.Len(), func(i int) uintptr { return w.refs(v.Index(i)) })
	case reflect.Struct:
		var n uintptr
		for _, i := range layoutOf(v.Type()).fields {
			n += w.refs(v.Field(i))
		}
		return n
	case reflect.Pointer:
		if v.IsNil() || !w.first(v.Pointer()) {
			return 0
		}
		e := v.Elem()
		return allocSize(e.Type().Size()) + w.refs(e)
	case reflect.Interface:
		if v.IsNil() {
			return 0
		}
		e := v.Elem()
		if e.Kind() == reflect.Pointer || e.Kind() == reflect.Map {
			return w.refs(e) // stored in the interface word
		}
		return allocSize(e.Type().Size()) + w.refs(e) // boxed
	case reflect.Map:
		if v.IsNil() || !w.first(v.Pointer()) {
			return 0
		}
		return mapSize(v.Type(), v.Len()) + w.mapRefs(v)
	}
	return 0 // numbers, bools; chans and funcs are not followed
}

// mapRefs returns what the keys and values of map m refer to.
func (w *costWalk) mapRefs(m reflect.Value) uintptr {
	kp, vp := typeHasPointers(m.Type().Key()), typeHasPointers(m.Type().Elem())
	if !kp && !vp || m.Len() == 0 {
		return 0
	}
	// Copied into two Values made once: it.Key and it.Value allocate a
	// copy per entry.
	var key, val reflect.Value
	if kp {
		key = reflect.New(m.Type().Key()).Elem()
	}
	if vp {
		val = reflect.New(m.Type().Elem()).Elem()
	}
	var n uintptr
	seen := 0
	for it := m.MapRange(); it.Next() && seen < costSample; seen++ {
		if kp {
			key.SetIterKey(it)
			n += w.refs(key)
		}
		if vp {
			val.SetIterValue(it)
			n += w.refs(val)
		}
	}
	return n * uintptr(m.Len()) / uintptr(seen)
}

// elems returns the sum of size(i) for i < n, extrapolated from the first
// costSample.
func (w *costWalk) elems(n int, size func(i int) uintptr) uintptr {
	if n == 0 {
		return 0
	}
	k := min(n, costSample)
	var sum uintptr
	for i := range k {
		sum += size(i)
	}
	return sum * uintptr(n) / uintptr(k)
}

// first reports whether the pointer or map p is to be followed: not seen
// before, and within costPointers.
func (w *costWalk) first(p uintptr) bool {
	for _, q := range w.few[:w.nfew] {
		if q == p {
			return false
		}
	}
	if w.nfew < len(w.few) {
		w.few[w.nfew] = p
		w.nfew++
		return true
	}
	if _, ok := w.seen[p]; ok || w.nfew+len(w.seen) >= costPointers {
		return false
	}
	if w.seen == nil {
		w.seen = make(map[uintptr]struct{})
	}
	w.seen[p] = struct{}{}
	return true
}

// mapSize approximates the memory of a Go map of type t with n entries:
// Swiss tables of groups of 8 slots (a control word and 8 keys and
// values), at most 7/8 full, whose slot count doubles up to 1024 per table;
// bigger maps split into tables that are between 7/16 and 7/8 full, about
// 2/3 on average.
func mapSize(t reflect.Type, n int) uintptr {
	group := 8 + 8*(t.Key().Size()+t.Elem().Size())
	const header = 48 // the map itself; each table's is about as big
	if n <= 8 {
		return allocSize(header) + allocSize(group)
	}
	slots := uintptr(16)
	for slots*7/8 < uintptr(n) && slots < 1024 {
		slots *= 2
	}
	if slots*7/8 < uintptr(n) {
		tables := (uintptr(n)*3/2 + 1023) / 1024
		return allocSize(header) + tables*(allocSize(header)+allocSize(128*group)+8)
	}
	return 2*allocSize(header) + allocSize(slots/8*group) + 8
}

// typeLayout is what a walk needs to know of a type, worked out once per
// type: one cache lookup per struct visited, not one per field.
type typeLayout struct {
	pointers bool  // values of the type refer to other memory
	fields   []int // of a struct: the indexes of the fields that do
}

// layouts caches layoutOf per type.
var layouts sync.Map // reflect.Type -> *typeLayout

func layoutOf(t reflect.Type) *typeLayout {
	if l, ok := layouts.Load(t); ok {
		return l.(*typeLayout)
	}
	l := &typeLayout{}
	switch t.Kind() {
	case reflect.String, reflect.Slice, reflect.Pointer, reflect.Interface, reflect.Map:
		l.pointers = true
	case reflect.Array:
		l.pointers = t.Len() > 0 && typeHasPointers(t.Elem())
	case reflect.Struct:
		for i := range t.NumField() {
			if typeHasPointers(t.Field(i).Type) {
				l.fields = append(l.fields, i)
			}
		}
		l.pointers = len(l.fields) > 0
	}
	layouts.Store(t, l)
	return l
}

// typeHasPointers reports whether values of t refer to other memory.
func typeHasPointers(t reflect.Type) bool { return layoutOf(t).pointers }

// allocSize returns the memory Go's allocator takes for an object of n
// bytes: n rounded up to its size class (within a few percent of the real
// classes below 32 KiB), or to 8 KiB pages above.
func allocSize(n uintptr) uintptr {
	switch {
	case n == 0:
		return 0
	case n <= 16:
		return (n + 7) &^ 7
	case n <= 128:
		return (n + 15) &^ 15
	case n <= 32<<10:
		// Classes step by about an eighth of the size: 128, 144, 160, ...
		// 256, 288, ... 512, 576, ...
		step := uintptr(16)
		for step*16 < n {
			step *= 2
		}
		return (n + step - 1) / step * step
	default:
		return (n + 8191) &^ 8191
	}
}
