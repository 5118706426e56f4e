"""Tools shared by connectors: qemu-img/qemu-nbd processes, NBD URIs, hashing an export.

Not a platform: KVM, the pull fronts of any site and the file-backed platforms
(VHDX, iSCSI LUNs, raw datastore files) all serve disks with qemu-nbd.
"""
