"""What a run is, before anything runs: the request (what the user asked), the mount plan (what the guest sees where), the timeline."""
