// Command go-control-plane is a benchmark peer for Trellis: it loads a
// snapshot exported by `trellis export` into go-control-plane's caches and
// serves ADS (Delta and SotW) so that trellis-loadtest can drive it exactly
// as it drives Trellis. A small HTTP control endpoint applies the harness's
// endpoint changes.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

func main() {
	exportPath := flag.String("export", "", "export file written by `trellis export` (required)")
	mode := flag.String("mode", "snapshot", "cache: snapshot (one snapshot per node) or linear (MuxCache of LinearCaches per class and type)")
	listen := flag.String("listen", "127.0.0.1:18000", "ADS gRPC address")
	control := flag.String("control", "127.0.0.1:18001", "HTTP control address (GET /generation/<g>, GET /healthz)")
	churn := flag.String("churn", "lt-churn/churn|8080", "name of the ClusterLoadAssignment the harness's changes move")
	flag.Parse()
	log.SetPrefix("go-control-plane peer: ")
	if *exportPath == "" {
		log.Fatal("--export is required")
	}

	start := time.Now()
	f, err := os.Open(*exportPath)
	if err != nil {
		log.Fatal(err)
	}
	classes, err := loadExport(f)
	f.Close()
	if err != nil {
		log.Fatal(err)
	}
	p, err := newPeer(*mode, *churn, classes)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("loaded %d classes in %v", len(classes), time.Since(start))

	ctx := context.Background()
	grpcServer := newGRPCServer(ctx, p)
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	go func() { log.Fatal(grpcServer.Serve(lis)) }()

	var ready atomic.Bool
	ctl, err := net.Listen("tcp", *control)
	if err != nil {
		log.Fatal(err)
	}
	go func() { log.Fatal(http.Serve(ctl, p.controlHandler(&ready))) }()

	ready.Store(true)
	fmt.Printf("serving ADS on %s, control on %s, %d classes, mode %s\n", lis.Addr(), ctl.Addr(), len(classes), *mode)
	select {}
}

// newGRPCServer registers the ADS service with the options of
// go-control-plane's example server: gRPC's default cap on concurrent
// streams per connection is far below what multiplexed clients open, and the
// keepalive settings match Envoy's recommended connection_keepalive.
func newGRPCServer(ctx context.Context, p *peer) *grpc.Server {
	g := grpc.NewServer(
		grpc.MaxConcurrentStreams(1000000),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time:    30 * time.Second,
			Timeout: 5 * time.Second,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             30 * time.Second,
			PermitWithoutStream: true,
		}),
	)
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, server.NewServer(ctx, p.cache, p.callbacks()))
	return g
}

// controlHandler serves the harness: GET /generation/<g> applies change g
// and answers only once every cache holds it; GET /healthz is 200 once both
// listeners are up.
func (p *peer) controlHandler(ready *atomic.Bool) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /generation/{g}", func(w http.ResponseWriter, r *http.Request) {
		g, err := strconv.ParseUint(r.PathValue("g"), 10, 64)
		if err != nil {
			http.Error(w, "generation must be a non-negative integer", http.StatusBadRequest)
			return
		}
		msg, err := p.applyGeneration(g)
		if err != nil {
			log.Printf("generation %d: %v", g, err)
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, msg)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if !ready.Load() {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}
