package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/netip"
	"strconv"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	gcplog "github.com/envoyproxy/go-control-plane/pkg/log"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	// The top-level resource types must be in the global proto registry for
	// anypb.UnmarshalNew. Nested Anys (HCM, filters, transport sockets) are
	// not: proto keeps an Any's value as opaque bytes, go-control-plane never
	// decodes them on the serving path, and they are re-marshaled byte for byte.
	_ "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

const exportFormat = "trellis-export 1"

// servedTypes are the types a Trellis export holds. Every class gets all of
// them, even when empty, so that a wildcard SotW request for an empty type
// still finds a version to answer with (snapshot mode) or a cache to route
// to (linear mode).
var servedTypes = []resource.Type{
	resource.ClusterType,
	resource.EndpointType,
	resource.ListenerType,
	resource.RouteType,
	resource.SecretType,
}

// exportFile is the JSON written by `trellis export`.
type exportFile struct {
	Format  string                      `json:"format"`
	Classes map[string][]exportResource `json:"classes"`
}

type exportResource struct {
	TypeURL string `json:"type_url"`
	Name    string `json:"name"`
	Version string `json:"version"`
	Any     []byte `json:"any"` // encoding/json decodes standard base64
}

// class is one class of simulated Envoys: the resources they all get.
type class struct {
	id string
	// resources is what a node's snapshot is built from (snapshot mode) or
	// what the linear caches start with (linear mode).
	resources map[resource.Type][]types.Resource
	// churnIndex is the position of the churned assignment in
	// resources[EndpointType], or -1 if the class does not hold it.
	churnIndex int
	churnBase  *endpoint.ClusterLoadAssignment // as exported
	// endpointsVersion is the snapshot version of the endpoints type; the
	// other types never change and keep baseVersion.
	endpointsVersion string

	nodes  []string                             // snapshot mode: node ids served this class
	linear map[resource.Type]*cache.LinearCache // linear mode
}

const baseVersion = "0"

// peer holds the loaded export and the go-control-plane cache serving it.
type peer struct {
	mode    string
	churn   string
	classes map[string]*class
	logger  gcplog.Logger

	snapshots cache.SnapshotCache // snapshot mode
	cache     cache.Cache         // what the xDS server serves

	mu      sync.Mutex        // guards the classes' mutable fields, nodes, changes
	nodes   map[string]string // snapshot mode: node id → class id
	changes int
}

// quietLogger drops go-control-plane's debug and info lines: the snapshot
// cache logs one Info line per delta watch, which at 10,000 streams would
// cost more than the serving being measured.
func quietLogger() gcplog.Logger {
	return gcplog.LoggerFuncs{
		WarnFunc:  func(f string, a ...any) { log.Printf("go-control-plane warn: "+f, a...) },
		ErrorFunc: func(f string, a ...any) { log.Printf("go-control-plane error: "+f, a...) },
	}
}

// loadExport decodes an export, decoding each distinct (type, name, version)
// once so that classes sharing a resource share the message.
func loadExport(r io.Reader) (map[string]*class, error) {
	var ex exportFile
	if err := json.NewDecoder(r).Decode(&ex); err != nil {
		return nil, fmt.Errorf("reading export: %w", err)
	}
	if ex.Format != exportFormat {
		return nil, fmt.Errorf("export format %q, want %q", ex.Format, exportFormat)
	}
	type key struct{ typeURL, name, version string }
	decoded := map[key]types.Resource{}
	classes := make(map[string]*class, len(ex.Classes))
	for id, items := range ex.Classes {
		c := &class{
			id:               id,
			resources:        map[resource.Type][]types.Resource{},
			churnIndex:       -1,
			endpointsVersion: baseVersion,
		}
		for _, t := range servedTypes {
			c.resources[t] = []types.Resource{}
		}
		for _, item := range items {
			if _, ok := c.resources[item.TypeURL]; !ok {
				return nil, fmt.Errorf("class %s: resource %q has unsupported type %s", id, item.Name, item.TypeURL)
			}
			k := key{item.TypeURL, item.Name, item.Version}
			msg, ok := decoded[k]
			if !ok {
				var err error
				if msg, err = decodeAny(item); err != nil {
					return nil, fmt.Errorf("class %s: %w", id, err)
				}
				decoded[k] = msg
			}
			c.resources[item.TypeURL] = append(c.resources[item.TypeURL], msg)
		}
		classes[id] = c
	}
	return classes, nil
}

func decodeAny(item exportResource) (types.Resource, error) {
	var a anypb.Any
	if err := proto.Unmarshal(item.Any, &a); err != nil {
		return nil, fmt.Errorf("%s %q: decoding Any: %w", item.TypeURL, item.Name, err)
	}
	if a.GetTypeUrl() != item.TypeURL {
		return nil, fmt.Errorf("%s %q: Any holds %s", item.TypeURL, item.Name, a.GetTypeUrl())
	}
	msg, err := anypb.UnmarshalNew(&a, proto.UnmarshalOptions{})
	if err != nil {
		return nil, fmt.Errorf("cannot decode %s %q: %w", item.TypeURL, item.Name, err)
	}
	// The caches index resources by the name inside the message.
	if got := cache.GetResourceName(msg); got != item.Name {
		return nil, fmt.Errorf("%s %q: message names itself %q", item.TypeURL, item.Name, got)
	}
	return msg, nil
}

func newPeer(mode, churn string, classes map[string]*class) (*peer, error) {
	p := &peer{mode: mode, churn: churn, classes: classes, logger: quietLogger(), nodes: map[string]string{}}
	for _, c := range classes {
		for i, r := range c.resources[resource.EndpointType] {
			if cache.GetResourceName(r) == churn {
				c.churnIndex = i
				c.churnBase = r.(*endpoint.ClusterLoadAssignment)
			}
		}
	}
	switch mode {
	case "snapshot":
		// Snapshots are set lazily, on a node's first request (onRequest).
		p.snapshots = cache.NewSnapshotCache(true, cache.IDHash{}, p.logger)
		p.cache = p.snapshots
	case "linear":
		// One linear cache per (class, type), all built now; the mux routes
		// each watch by the node's class and the request's type.
		mux := &cache.MuxCache{
			Classify:      func(r *cache.Request) string { return muxKey(r.GetNode(), r.GetTypeUrl()) },
			ClassifyDelta: func(r *cache.DeltaRequest) string { return muxKey(r.GetNode(), r.GetTypeUrl()) },
			Caches:        map[string]cache.Cache{},
		}
		for id, c := range classes {
			c.linear = map[resource.Type]*cache.LinearCache{}
			for t, items := range c.resources {
				lc := cache.NewLinearCache(t,
					cache.WithInitialResources(cache.IndexRawResourcesByName(items)),
					cache.WithLogger(p.logger))
				c.linear[t] = lc
				mux.Caches[id+"|"+t] = lc
			}
		}
		p.cache = mux
	default:
		return nil, fmt.Errorf("unknown mode %q (want snapshot or linear)", mode)
	}
	return p, nil
}

func muxKey(node *core.Node, typeURL string) string {
	return node.GetCluster() + "|" + typeURL
}

// callbacks refuse nodes of unknown classes and, in snapshot mode, give a
// node its snapshot before the server creates the first watch for it.
func (p *peer) callbacks() server.Callbacks {
	return server.CallbackFuncs{
		StreamRequestFunc: func(_ int64, r *discovery.DiscoveryRequest) error {
			return p.onRequest(r.GetNode())
		},
		StreamDeltaRequestFunc: func(_ int64, r *discovery.DeltaDiscoveryRequest) error {
			return p.onRequest(r.GetNode())
		},
	}
}

func (p *peer) onRequest(node *core.Node) error {
	// Only a stream's first request must carry the node; the delta server
	// runs this callback before filling it in on later ones.
	if node == nil {
		return nil
	}
	c, ok := p.classes[node.GetCluster()]
	if !ok {
		log.Printf("refusing node %q: unknown class %q", node.GetId(), node.GetCluster())
		return fmt.Errorf("unknown class %q", node.GetCluster())
	}
	if p.mode != "snapshot" {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.nodes[node.GetId()]; ok {
		return nil
	}
	snap, err := c.snapshot()
	if err != nil {
		return err
	}
	if err := p.snapshots.SetSnapshot(context.Background(), node.GetId(), snap); err != nil {
		return err
	}
	p.nodes[node.GetId()] = c.id
	c.nodes = append(c.nodes, node.GetId())
	return nil
}

// snapshot builds a node's snapshot of the class's current resources.
// Called with p.mu held.
func (c *class) snapshot() (*cache.Snapshot, error) {
	snap, err := cache.NewSnapshot(baseVersion, c.resources)
	if err != nil {
		return nil, err
	}
	// NewSnapshot gives every type the same version; SotW compares versions
	// per type, so only the endpoints type gets a new one on a change.
	snap.Resources[types.Endpoint].Version = c.endpointsVersion
	return snap, nil
}

// churnAddress is the address the harness's change g gives the churned
// assignment, as Trellis's load test does to its mesh.
func churnAddress(g uint64) string {
	return netip.AddrFrom4([4]byte{10, 250, byte(g >> 8), byte(g)}).String()
}

// applyGeneration applies change g and returns once every cache holds it.
func (p *peer) applyGeneration(g uint64) (string, error) {
	start := time.Now()
	addr := churnAddress(g)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.changes++
	// Classes share the exported assignment, so they share its update too.
	updated := map[*endpoint.ClusterLoadAssignment]*endpoint.ClusterLoadAssignment{}
	classes, nodes := 0, 0
	for id, c := range p.classes {
		if c.churnIndex < 0 {
			continue
		}
		cla, ok := updated[c.churnBase]
		if !ok {
			cla = withAddress(c.churnBase, addr)
			updated[c.churnBase] = cla
		}
		classes++
		switch p.mode {
		case "snapshot":
			// In place is safe: the slice is the class's own, and a snapshot
			// copies it into its own map.
			c.resources[resource.EndpointType][c.churnIndex] = cla
			c.endpointsVersion = "e" + strconv.Itoa(p.changes)
			// The per-node rebuild go-control-plane's users do.
			for _, node := range c.nodes {
				snap, err := c.snapshot()
				if err != nil {
					return "", err
				}
				if err := p.snapshots.SetSnapshot(context.Background(), node, snap); err != nil {
					return "", fmt.Errorf("node %s: %w", node, err)
				}
				nodes++
			}
		case "linear":
			if err := c.linear[resource.EndpointType].UpdateResource(p.churn, cla); err != nil {
				return "", fmt.Errorf("class %s: %w", id, err)
			}
		}
	}
	what := fmt.Sprintf("%d linear caches", classes)
	if p.mode == "snapshot" {
		what = fmt.Sprintf("%d classes, %d node snapshots", classes, nodes)
	}
	msg := fmt.Sprintf("generation %d (%s) applied to %s in %v", g, addr, what, time.Since(start))
	log.Print(msg)
	return msg + "\n", nil
}

// withAddress returns a copy of cla with every lb endpoint's socket address
// set to addr, ports kept. Never mutates cla: responses in flight may be
// marshaling it.
func withAddress(cla *endpoint.ClusterLoadAssignment, addr string) *endpoint.ClusterLoadAssignment {
	out := proto.Clone(cla).(*endpoint.ClusterLoadAssignment)
	for _, locality := range out.GetEndpoints() {
		for _, lb := range locality.GetLbEndpoints() {
			if sa := lb.GetEndpoint().GetAddress().GetSocketAddress(); sa != nil {
				sa.Address = addr
			}
		}
	}
	return out
}
