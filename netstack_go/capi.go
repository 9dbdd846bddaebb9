// Package main is corral's netstack, built with -buildmode=c-shared.
// capi.go is the only file that imports "C"; every exported function follows
// the status-code contract of bindings/netstack.h.
package main

// #cgo CFLAGS: -I${SRCDIR}/../bindings
// #include "netstack.h"
import "C"

//export corral_abi_version
func corral_abi_version() C.int { return C.CORRAL_NET_ABI_VERSION }

func main() {}
