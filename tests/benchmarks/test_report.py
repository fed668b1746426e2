from imageragturbo.benchmarks.report import table, update_section


def test_table():
    assert table(["a", "b"], [[1, "x"], [2, "y"]], ["---", "---:"]) == ["| a | b |", "| --- | ---: |", "| 1 | x |", "| 2 | y |"]
    assert table(["a"], [], "---")[1] == "| --- |"


def test_update_section_keeps_the_rest_of_the_page(tmp_path):
    page = tmp_path / "sub" / "page.md"
    update_section(page, "<!-- b -->", "<!-- /b -->", "one\n\n", preamble="# Page\n")
    assert page.read_text() == "# Page\n\n<!-- b -->\none\n<!-- /b -->\n"
    page.write_text(page.read_text() + "\nhand-written\n")
    update_section(page, "<!-- b -->", "<!-- /b -->", "two", preamble="# Page\n")
    assert page.read_text() == "# Page\n\n<!-- b -->\ntwo\n<!-- /b -->\n\nhand-written\n"
    update_section(page, "<!-- c -->", "<!-- /c -->", "three", preamble="# Page\n")
    assert page.read_text().endswith("hand-written\n\n<!-- c -->\nthree\n<!-- /c -->\n")
