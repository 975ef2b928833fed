async def test_track_stored(gateway_client, tmp_path):
    client = await gateway_client(f"""
        destinations:
          - name: Archive
            type: file
            settings: {{path: {tmp_path / 'out.jsonl'}}}
        """)
    r = await client.post("/v1/track", json={"userId": "u", "event": "E"}, headers={"Authorization": "Bearer test-write-key"})
    assert r.status == 200
