/* corral netstack C ABI: the only contract between supervisor (Python, cffi)
 * and netstack_go (Go, cgo).  cffi reads this file as its cdef; cgo #includes it.
 *
 * Rules (DESIGN §5): Python holds opaque integer handles, never Go pointers.
 * Every call returns an int status: 0 or a positive count on success, one of
 * the negative CORRAL_E* codes on failure.  Results come back in caller-owned
 * buffers.  Go never calls into Python.
 */
#ifndef CORRAL_NETSTACK_H
#define CORRAL_NETSTACK_H

#include <stdint.h>

/* Bumped whenever a signature or a struct below changes. */
#define CORRAL_NET_ABI_VERSION 1

/* Status codes. */
#define CORRAL_OK 0
#define CORRAL_EINVAL -1     /* bad argument */
#define CORRAL_EBADHANDLE -2 /* unknown or closed handle */
#define CORRAL_ENOSPC -3     /* caller's buffer too small */
#define CORRAL_EINTERNAL -4  /* stack failure; see corral_last_error */

/* ABI version the library was compiled with. */
int corral_abi_version(void);

#endif
