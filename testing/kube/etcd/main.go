// Command etcd is etcd's own server entry point, built from its Go module so
// the test suite's API server has a store without a downloaded binary.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
