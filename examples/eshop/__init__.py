"""The eshop sample: catalog, basket, ordering, payment and an HTTP gateway (docs/eshop.md)."""
