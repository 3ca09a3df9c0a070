"""Beyond one engine (lesson 14): KV transfer between replicas (`kv_transfer`), live migration
(`migration`); the router and its policies live beside them."""
