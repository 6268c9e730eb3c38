package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpoint "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listener "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcm "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

const testChurn = "lt-churn/churn|8080"

// testExport is a two-class export: each class has its own cluster and
// listener and both share the churned assignment, as in Trellis's mesh.
func testExport(t *testing.T) []byte {
	t.Helper()
	item := func(m proto.Message, name, version string) exportResource {
		a, err := anypb.New(m)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := proto.Marshal(a)
		if err != nil {
			t.Fatal(err)
		}
		return exportResource{TypeURL: a.GetTypeUrl(), Name: name, Version: version, Any: raw}
	}
	cla := &endpoint.ClusterLoadAssignment{
		ClusterName: testChurn,
		Endpoints: []*endpoint.LocalityLbEndpoints{{
			LbEndpoints: []*endpoint.LbEndpoint{{
				HostIdentifier: &endpoint.LbEndpoint_Endpoint{Endpoint: &endpoint.Endpoint{
					Address: &core.Address{Address: &core.Address_SocketAddress{SocketAddress: &core.SocketAddress{
						Address:       "10.0.0.1",
						PortSpecifier: &core.SocketAddress_PortValue{PortValue: 8080},
					}}},
				}},
			}},
		}},
	}
	ex := exportFile{Format: exportFormat, Classes: map[string][]exportResource{}}
	for _, id := range []string{"a", "b"} {
		// A nested Any the peer never decodes: it must pass through intact.
		manager, err := anypb.New(&hcm.HttpConnectionManager{
			StatPrefix:     "ingress-" + id,
			RouteSpecifier: &hcm.HttpConnectionManager_Rds{Rds: &hcm.Rds{RouteConfigName: "route-" + id}},
		})
		if err != nil {
			t.Fatal(err)
		}
		ex.Classes[id] = []exportResource{
			item(&cluster.Cluster{Name: "cluster-" + id}, "cluster-"+id, "c1"),
			item(cla, testChurn, "e1"),
			item(&listener.Listener{Name: "listener-" + id, FilterChains: []*listener.FilterChain{{
				Filters: []*listener.Filter{{Name: "hcm", ConfigType: &listener.Filter_TypedConfig{TypedConfig: manager}}},
			}}}, "listener-"+id, "l1"),
		}
	}
	data, err := json.Marshal(ex)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestPeer(t *testing.T) {
	for _, mode := range []string{"snapshot", "linear"} {
		t.Run(mode, func(t *testing.T) { testPeer(t, mode) })
	}
}

func testPeer(t *testing.T, mode string) {
	classes, err := loadExport(bytes.NewReader(testExport(t)))
	if err != nil {
		t.Fatal(err)
	}
	// Both classes must share the one decoded assignment.
	if classes["a"].resources[resource.EndpointType][0] != classes["b"].resources[resource.EndpointType][0] {
		t.Error("the shared assignment was decoded twice")
	}
	p, err := newPeer(mode, testChurn, classes)
	if err != nil {
		t.Fatal(err)
	}
	var ready atomic.Bool
	ready.Store(true)
	control := p.controlHandler(&ready)
	get(t, control, "/healthz", http.StatusOK)
	get(t, control, "/generation/x", http.StatusBadRequest)
	get(t, control, "/generation/-1", http.StatusBadRequest)
	get(t, control, "/generation/3", http.StatusOK)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ads := dialADS(t, ctx, p)

	// Class a over Delta: wildcard clusters, then the assignment by name.
	a := newDeltaClient(t, ctx, ads, "node-a", "a")
	if got := names(t, a.request(resource.ClusterType, nil)); len(got) != 1 || got[0] != "cluster-a" {
		t.Fatalf("node of class a got clusters %v", got)
	}
	if got := churnAddr(t, a.request(resource.EndpointType, []string{testChurn})); got != "10.250.0.3" {
		t.Fatalf("after /generation/3 the assignment has %s", got)
	}

	// A change lands on a stream already subscribed.
	get(t, control, "/generation/260", http.StatusOK)
	if got := churnAddr(t, a.recv()); got != "10.250.1.4" {
		t.Fatalf("after /generation/260 the assignment has %s", got)
	}

	// Class b over Delta gets its own cluster.
	b := newDeltaClient(t, ctx, ads, "node-b", "b")
	if got := names(t, b.request(resource.ClusterType, nil)); len(got) != 1 || got[0] != "cluster-b" {
		t.Fatalf("node of class b got clusters %v", got)
	}

	// And over SotW.
	s, err := ads.StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &core.Node{Id: "node-sotw", Cluster: "b"}
	if err := s.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.ListenerType}); err != nil {
		t.Fatal(err)
	}
	resp, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if got := names(t, resp.GetResources()); len(got) != 1 || got[0] != "listener-b" {
		t.Fatalf("SotW node of class b got listeners %v", got)
	}
	var l listener.Listener
	if err := resp.GetResources()[0].UnmarshalTo(&l); err != nil {
		t.Fatal(err)
	}
	var manager hcm.HttpConnectionManager
	if err := l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(&manager); err != nil || manager.GetRds().GetRouteConfigName() != "route-b" {
		t.Fatalf("nested HttpConnectionManager came back as %v (%v)", &manager, err)
	}
	if err := s.Send(&discovery.DiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNames: []string{testChurn}}); err != nil {
		t.Fatal(err)
	}
	if resp, err = s.Recv(); err != nil {
		t.Fatal(err)
	}
	if got := churnAddr(t, resp.GetResources()); got != "10.250.1.4" {
		t.Fatalf("SotW node got the assignment with %s", got)
	}

	// A node of an unknown class is refused.
	u, err := ads.DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := u.Send(&discovery.DeltaDiscoveryRequest{Node: &core.Node{Id: "node-x", Cluster: "nope"}, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	if _, err := u.Recv(); err == nil {
		t.Fatal("a node of an unknown class was served")
	}
}

func get(t *testing.T, h http.Handler, path string, want int) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	if rec.Code != want {
		t.Fatalf("GET %s: %d %q, want %d", path, rec.Code, rec.Body, want)
	}
}

// dialADS serves the peer on an in-memory listener and connects to it.
func dialADS(t *testing.T, ctx context.Context, p *peer) discovery.AggregatedDiscoveryServiceClient {
	lis := bufconn.Listen(1 << 20)
	srv := newGRPCServer(ctx, p)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return discovery.NewAggregatedDiscoveryServiceClient(conn)
}

// deltaClient subscribes as Envoy does over one Delta ADS stream and ACKs
// every response.
type deltaClient struct {
	t      *testing.T
	stream discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	node   *core.Node // sent on the first request only
}

func newDeltaClient(t *testing.T, ctx context.Context, ads discovery.AggregatedDiscoveryServiceClient, id, class string) *deltaClient {
	s, err := ads.DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &deltaClient{t: t, stream: s, node: &core.Node{Id: id, Cluster: class}}
}

// request subscribes to names of typeURL (nil: wildcard) and returns the
// resources of the response.
func (c *deltaClient) request(typeURL string, names []string) []*anypb.Any {
	c.t.Helper()
	if err := c.stream.Send(&discovery.DeltaDiscoveryRequest{Node: c.node, TypeUrl: typeURL, ResourceNamesSubscribe: names}); err != nil {
		c.t.Fatal(err)
	}
	c.node = nil
	return c.recv()
}

func (c *deltaClient) recv() []*anypb.Any {
	c.t.Helper()
	resp, err := c.stream.Recv()
	if err != nil {
		c.t.Fatal(err)
	}
	if err := c.stream.Send(&discovery.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}); err != nil {
		c.t.Fatal(err)
	}
	out := make([]*anypb.Any, 0, len(resp.GetResources()))
	for _, r := range resp.GetResources() {
		out = append(out, r.GetResource())
	}
	return out
}

func names(t *testing.T, resources []*anypb.Any) []string {
	t.Helper()
	var out []string
	for _, a := range resources {
		m, err := a.UnmarshalNew()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, m.(interface{ GetName() string }).GetName())
	}
	return out
}

// churnAddr returns the address of the churned assignment's one endpoint.
func churnAddr(t *testing.T, resources []*anypb.Any) string {
	t.Helper()
	if len(resources) != 1 {
		t.Fatalf("got %d assignments, want 1", len(resources))
	}
	var cla endpoint.ClusterLoadAssignment
	if err := resources[0].UnmarshalTo(&cla); err != nil {
		t.Fatal(err)
	}
	if cla.GetClusterName() != testChurn {
		t.Fatalf("got assignment %q", cla.GetClusterName())
	}
	sa := cla.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
	if sa.GetPortValue() != 8080 {
		t.Fatalf("port became %d", sa.GetPortValue())
	}
	return sa.GetAddress()
}
