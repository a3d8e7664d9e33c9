"""vhost-user device back-end library (virtqueues, guest memory); knows nothing about IP."""
