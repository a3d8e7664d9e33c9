"""The test suite, a package so that its modules import one another by name (`tests.fakes`,
`tests.netns.sandbox`) from the repository root, which pytest puts on sys.path:

    unit/    no root, no namespaces (a few tests that need them skip without root)
    netns/   end to end in network namespaces the tests build, and the helpers for that
    virtio/  the virtio/ library alone, through a test front end
"""
