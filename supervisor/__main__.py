from .warm.client import console

console()
