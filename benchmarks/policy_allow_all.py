"""`corral run --policy` file for the benchmark: an async on_connect that allows every flow.

Measures the cost of a Python callback per connection (issue 3: new connections/s with an
async on_connect must stay >= 0.3x no sandbox).  Runs only inside the benchmark's world.
"""

import corral


async def on_connect(req):
    return corral.ALLOW
