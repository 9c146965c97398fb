import pytest


@pytest.mark.gen_test
async def test_table_page_delivery(server, connect, barrier):
    a = await connect(user_id=1)
    b = await connect(user_id=2)
    await a.subscribe("table", table_id=10)
    msg = {"type": "rows_created", "table_id": 10, "rows": [{"id": 1}], "metadata": {}, "before_row_id": None}
    server.publish(msg)
    assert await a.recv() == msg
    await barrier(a, b)
