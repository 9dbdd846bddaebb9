module corral.dev/netstack

go 1.22
